"""The chat page `serve` answers at GET / (off with --no-ui): runtime/ui/ holds its HTML, script and style
sheet as written (package data: no build step), served from memory with their content types. The page's
Content-Security-Policy lets it load and connect to its own origin only (images: the data: URLs it makes
from the picked file), so the browser itself refuses any request elsewhere.
"""
from pathlib import Path

UI_DIR = Path(__file__).resolve().parent / "ui"
# route -> (file in UI_DIR, media type; Starlette adds "; charset=utf-8" to text/*)
ASSETS = {"/": ("index.html", "text/html"),
          "/ui/chat.js": ("chat.js", "text/javascript"),
          "/ui/chat.css": ("chat.css", "text/css")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}


def add_chat_page(app) -> None:
    """Add GET routes for the page and its assets to a FastAPI app (read once, here)."""
    from fastapi.responses import Response

    def asset(body: bytes, media_type: str):
        async def get():
            return Response(body, media_type=media_type, headers=HEADERS)
        return get

    for route, (name, media_type) in ASSETS.items():
        app.add_api_route(route, asset((UI_DIR / name).read_bytes(), media_type), methods=["GET"],
                          include_in_schema=False)
