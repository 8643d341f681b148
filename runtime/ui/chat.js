"use strict";
// The chat page of `cogvlm2-lite serve`. One conversation at a time, with at most one image (CogVLM2 takes one),
// sent as OpenAI messages to /v1/chat/completions; answers are read as they stream (SSE over fetch +
// ReadableStream) and Stop aborts the fetch, which closes the connection: the server cancels the request and
// frees its row. Every URL is relative to the page, so the page talks to its own server only.

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "cogvlm2-lite.api-key";   // sessionStorage: this tab only
const ONE_IMAGE = "CogVLM2 takes one image per conversation: start a new conversation to ask about another.";

const state = {
  turns: [],         // {question, image (data URL or null), answer (null while it streams)}, sent as history
  image: null,       // the attached image (data URL), not sent yet
  controller: null,  // the running request's AbortController
};

// --- the server ----------------------------------------------------------------------------------

function headers() {
  const h = {"content-type": "application/json"};
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) h.authorization = "Bearer " + key;
  return h;
}

class ServerError extends Error {}

/** The server's own sentence from an error response ({"error": {"message"}}), or the HTTP status. */
async function serverError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: the status line says it */ }
  if (response.status === 401) askForKey(message);
  return new ServerError(message);
}

/** The `data:` payloads of a server-sent event stream, as they arrive. */
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

/** The model's name in the header; asks for the API key when the server wants one. */
async function loadModel() {
  const response = await fetch("v1/models", {headers: headers()});
  if (!response.ok) {
    const error = await serverError(response);
    if (response.status !== 401) showError(error.message);
    return;
  }
  const models = await response.json();
  $("model").textContent = models.data.map((m) => m.id).join(", ");
}

function askForKey(why) {
  sessionStorage.removeItem(KEY_STORAGE);
  $("key-why").textContent = why;
  $("key").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

// --- the conversation ----------------------------------------------------------------------------

function messages() {
  const out = [];
  for (const t of state.turns) {
    const content = t.image ? [{type: "text", text: t.question}, {type: "image_url", image_url: {url: t.image}}]
                            : t.question;
    out.push({role: "user", content});
    if (t.answer !== null) out.push({role: "assistant", content: t.answer});
  }
  return out;
}

/** The numeric field's value as typed (the server checks it and says what is wrong), or undefined if empty. */
function field(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

function bubble(role) {
  const li = document.createElement("li");
  li.className = "message " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Model";
  const text = document.createElement("div");
  text.className = "text";
  li.append(who, text);
  $("messages").append(li);
  $("hint").hidden = true;
  return li;
}

function scrollDown() {
  const chat = $("chat");
  chat.scrollTop = chat.scrollHeight;
}

async function send() {
  const question = $("prompt").value;
  if (state.controller || !question.trim()) return;
  clearError();
  const image = state.image;
  const turn = {question, image, answer: null};
  state.turns.push(turn);
  const body = {messages: messages(), stream: true, stream_options: {include_usage: true},
                temperature: field("temperature"), max_tokens: field("max-tokens")};

  const asked = bubble("user");
  asked.querySelector(".text").textContent = question;
  if (image) {
    const img = document.createElement("img");
    img.src = image;
    img.alt = "The image of this conversation";
    asked.append(img);
  }
  const answer = bubble("assistant");
  answer.dataset.state = "waiting";
  answer.setAttribute("aria-busy", "true");   // screen readers read the answer once, when it has ended
  const out = answer.querySelector(".text");
  const stats = document.createElement("p");
  stats.className = "stats";
  answer.append(stats);
  $("prompt").value = "";
  growPrompt();
  setImage(null);
  scrollDown();

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let first = null, last = null, tokens = 0, finish = null, usage = null, text = "";
  try {
    const response = await fetch("v1/chat/completions", {method: "POST", headers: headers(),
                                                         body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) throw await serverError(response);
    answer.dataset.state = "streaming";
    for await (const data of events(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ServerError(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (typeof choice.delta.content === "string" && !choice.delta.role) {  // one chunk per generated token
        last = performance.now();
        if (first === null) first = last;
        tokens += 1;
        text += choice.delta.content;
        out.textContent = text;
        scrollDown();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    answer.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      answer.dataset.state = "stopped";
    } else if (!text) {  // nothing was answered: take the question back to fix it and send it again
      state.turns = state.turns.filter((t) => t !== turn);
      asked.remove();
      answer.remove();
      $("hint").hidden = $("messages").children.length > 0;
      $("prompt").value = question;
      growPrompt();
      setImage(image);
      showError(e instanceof ServerError ? e.message : `The server cannot be reached (${e.message}).`);
      return;
    } else {
      answer.dataset.state = "error";
      showError(e.message);
    }
  } finally {
    answer.removeAttribute("aria-busy");
    state.controller = null;
    setBusy(false);
    $("prompt").focus();
  }
  turn.answer = text;
  stats.textContent = describe(usage ? usage.completion_tokens : tokens, started, first, last, tokens,
                               answer.dataset.state === "stopped" ? "stopped" : finish === "length" ? "cut at max tokens" : "");
  updateAttach();
}

/** "N tokens · TTFT x ms · y tokens/s": TTFT from sending to the first token, the rate over the tokens after it. */
function describe(count, started, first, last, streamed, note) {
  const parts = [`${count} token${count === 1 ? "" : "s"}`];
  if (first !== null) parts.push(`TTFT ${Math.round(first - started)} ms`);
  if (streamed > 1 && last > first) parts.push(`${((streamed - 1) / ((last - first) / 1000)).toFixed(1)} tokens/s`);
  if (note) parts.push(note);
  return parts.join(" · ");
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.turns = [];
  $("messages").replaceChildren();
  $("hint").hidden = false;
  $("prompt").value = "";
  growPrompt();
  setImage(null);
  clearError();
  $("prompt").focus();
}

// --- the image -----------------------------------------------------------------------------------

function attach(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(`${file.name || "That file"} is not an image.`);
    return;
  }
  if (state.turns.some((t) => t.image)) {
    showError(ONE_IMAGE);
    return;
  }
  const reader = new FileReader();
  reader.onload = () => { clearError(); setImage(reader.result); };
  reader.onerror = () => showError(`${file.name} cannot be read.`);
  reader.readAsDataURL(file);
}

function setImage(dataUrl) {
  state.image = dataUrl;
  $("attachment").hidden = dataUrl === null;
  if (dataUrl === null) $("thumb").removeAttribute("src"); else $("thumb").src = dataUrl;
  $("file").value = "";
  updateAttach();
}

function updateAttach() {
  const sent = state.turns.some((t) => t.image);
  $("attach").disabled = sent || state.image !== null;
  $("attach").title = sent ? ONE_IMAGE : state.image ? "An image is attached" : "Pick an image (or drop or paste one)";
}

// --- the page ------------------------------------------------------------------------------------

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function growPrompt() {
  const p = $("prompt");
  p.style.height = "auto";
  p.style.height = Math.min(p.scrollHeight, 200) + "px";
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    if (e.key === "Escape" && state.controller) state.controller.abort();
  });
  $("prompt").addEventListener("input", growPrompt);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new").addEventListener("click", newConversation);
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => attach($("file").files[0]));
  $("remove-image").addEventListener("click", () => { setImage(null); $("prompt").focus(); });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) { e.preventDefault(); attach(item.getAsFile()); }
  });
  const dragsFiles = (e) => [...e.dataTransfer.types].includes("Files");   // text dropped in the box stays text
  document.addEventListener("dragover", (e) => {
    if (!dragsFiles(e)) return;
    e.preventDefault();
    document.body.classList.add("dropping");
  });
  document.addEventListener("dragleave", (e) => {
    if (!e.relatedTarget) document.body.classList.remove("dropping");
  });
  document.addEventListener("drop", (e) => {
    document.body.classList.remove("dropping");
    if (!dragsFiles(e)) return;
    e.preventDefault();
    attach(e.dataTransfer.files[0]);
  });
  $("key-form").addEventListener("submit", () => {
    sessionStorage.setItem(KEY_STORAGE, $("key").value);
    loadModel();
  });
  updateAttach();
  loadModel().catch((e) => showError(`The server cannot be reached (${e.message}).`));
  $("prompt").focus();
});
