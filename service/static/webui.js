// The chat page's script. Answers are markdown: rendered by marked, sanitized by DOMPurify
// (the model's text is untrusted: a <script> or an onerror in it must never run; the page's
// Content-Security-Policy allows no inline script either), code highlighted by highlight.js.
// Reasoning shows in a collapsed block, tool calls as calls (name and arguments, as text).
const $ = (id) => document.getElementById(id);
let history = [];
let controller = null;

for (const id of ["temperature", "top_p", "max_tokens"]) {
  const show = () => { $(id + "-value").textContent = $(id).value; };
  $(id).addEventListener("input", show);
  show();
}

function showError(message) {
  $("error").textContent = message;
  $("error").style.display = message ? "block" : "none";
}

function bubble(role, text, images = []) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  for (const url of images) {  // the user's own files, as data: URLs
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attached image";
    div.appendChild(img);
  }
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text));
  for (const link of element.querySelectorAll("a")) { link.target = "_blank"; link.rel = "noopener noreferrer"; }
  for (const code of element.querySelectorAll("pre code")) hljs.highlightElement(code);
}

// One assistant reply: its parts are made as they first arrive, so a plain answer is just text.
class Reply {
  constructor() {
    this.div = bubble("assistant", "");
    this.div.dataset.state = "streaming";
    this.answer = "";
    this.reasoning = "";
    this.calls = [];
    this.pending = false;
  }

  part(cls, tag, before) {
    let el = this.div.querySelector(":scope > ." + cls);
    if (!el) {
      el = document.createElement(tag);
      el.className = cls;
      this.div.insertBefore(el, before ? this.div.firstChild : null);
    }
    return el;
  }

  addReasoning(text) {
    this.reasoning += text;
    const box = this.part("reasoning", "details", true);
    if (!box.firstChild) {
      const summary = document.createElement("summary");
      summary.textContent = "Reasoning";
      const body = document.createElement("div");
      body.className = "reasoning-text";
      box.append(summary, body);
    }
    box.querySelector(".reasoning-text").textContent = this.reasoning;
  }

  addContent(text) {
    this.answer += text;
    if (this.pending) return;
    this.pending = true;  // one render per frame, however many deltas arrive
    requestAnimationFrame(() => { this.pending = false; this.render(); });
  }

  render() {
    renderMarkdown(this.part("content", "div", false), this.answer);
  }

  addToolCall(fragment) {
    const call = this.calls[fragment.index] || (this.calls[fragment.index] = { name: "", arguments: "" });
    if (fragment.name) call.name += fragment.name;
    if (fragment.arguments) call.arguments += fragment.arguments;
    const tools = this.part("tools", "div", false);
    tools.replaceChildren(...this.calls.filter(Boolean).map((c) => {
      const box = document.createElement("div");
      box.className = "tool-call";
      const name = document.createElement("span");
      name.className = "tool-name";
      name.textContent = c.name + "(…)";
      const args = document.createElement("pre");
      args.textContent = c.arguments;
      box.append(name, args);
      return box;
    }));
  }
}

async function loadInfo() {
  try {
    const info = await (await fetch("api/info")).json();
    if (info.error) { showError(info.error); $("model").textContent = "unavailable"; return; }
    $("model").textContent = info.models.join(", ");
  } catch (e) {
    showError("cannot reach this page's server");
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

let attached = [];  // data: URLs of the images the next message sends

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function send(text) {
  showError("");
  const images = attached;
  attached = [];
  $("attached").textContent = "";
  const content = images.length
    ? [...images.map((url) => ({ type: "image_url", image_url: { url } })), { type: "text", text }]
    : text;
  history.push({ role: "user", content });
  bubble("user", text, images);
  const reply = new Reply();
  controller = new AbortController();
  busy(true);
  try {
    const response = await fetch("api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: controller.signal,
      body: JSON.stringify({
        messages: history, system: $("system").value,
        temperature: parseFloat($("temperature").value), top_p: parseFloat($("top_p").value),
        max_tokens: parseInt($("max_tokens").value, 10),
      }),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const event = JSON.parse(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
        if (event.reasoning) reply.addReasoning(event.reasoning);
        if (event.delta) reply.addContent(event.delta);
        if (event.tool_call) reply.addToolCall(event.tool_call);
        if (event.error) showError(event.error);
        if (event.done) reply.div.dataset.finish = event.done;
      }
      $("log").scrollTop = $("log").scrollHeight;
    }
    if (reply.answer) reply.render();  // the last frame's text, before the reply says it is done
    reply.div.dataset.state = "done";
  } catch (e) {
    if (reply.answer) reply.render();
    reply.div.dataset.state = e.name === "AbortError" ? "stopped" : "failed";
    if (e.name !== "AbortError") showError("the connection to this page's server was lost");
  } finally {
    controller = null;
    busy(false);
  }
  if (reply.answer || reply.calls.length) history.push({ role: "assistant", content: reply.answer });
  else { history.pop(); if (!reply.div.textContent) reply.div.remove(); }
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("attach").addEventListener("click", () => $("image").click());
$("image").addEventListener("change", async () => {
  try {
    attached = attached.concat(await Promise.all([...$("image").files].map(readAsDataURL)));
    $("attached").textContent = attached.length ? `${attached.length} image(s)` : "";
  } catch (e) {
    showError("cannot read that file");
  }
  $("image").value = "";
});
$("new").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  attached = [];
  $("attached").textContent = "";
  $("log").innerHTML = "";
  showError("");
});
loadInfo();
