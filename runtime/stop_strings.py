"""Stop strings: the answer ends before the first one, decided as each token's text arrives.

The scheduler runs this per sequence, so a stop string ends the request at the token that completes it,
like the model's own stop ids: the row is freed at once, `finish_reason` is "stop", and the usage counts
exactly the tokens up to and including that one, the same on every run (vLLM stops in its detokenizer for
the same reason). Streamed text holds back the tail that could still grow into a stop string.
"""


class StopStrings:
    """Holds back the end of the text that could still become a stop string; cuts at the first one."""

    def __init__(self, stops: tuple):
        self.stops = stops
        self.keep = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.hit = False

    def push(self, piece: str) -> tuple[str, bool]:
        """A token's text -> (text safe to send now, whether a stop string was reached); nothing more after one."""
        if self.hit:
            return "", True
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.sent:end]
            self.sent = end
            self.text = self.text[:end]
            self.hit = True
            return out, True
        end = max(self.sent, len(self.text) - self.keep)
        out = self.text[self.sent:end]
        self.sent = end
        return out, False

    def flush(self) -> str:
        """The held-back tail, at the end of the answer (empty after a stop string)."""
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out
