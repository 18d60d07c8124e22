// The chat page: keeps the conversation in this browser's local storage (it survives a reload until "New chat"),
// streams replies from /v1/chat/completions (server-sent events over fetch), renders them as Markdown
// (markdown.js: DOM nodes, never HTML), and stops a reply by aborting its request (the server then cancels the
// generation). While a reply streams the page follows its end, keeping it above the composer, until the user
// scrolls up; scrolling back to the bottom follows again.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation"), input = $("input"), sendButton = $("send"), stopButton = $("stop");
const systemBox = $("system"), keyBox = $("api-key"), statusLine = $("status");

const CONVERSATION = "llama3.conversation";
let modelName = null;
let messages = loadConversation();  // [{role, content}] of this chat, without the system prompt
let controller = null;  // AbortController of the reply being streamed
let following = true;   // keep the newest text in view

function loadConversation() {
  try {
    const stored = JSON.parse(localStorage.getItem(CONVERSATION) || "[]");
    const valid = Array.isArray(stored) && stored.every((m) => m && typeof m.content === "string" &&
                                                           (m.role === "user" || m.role === "assistant"));
    if (!valid) return [];
    // A reload mid-reply leaves a question without an answer: drop it so turns keep alternating.
    while (stored.length && (stored.at(-1).role === "user" || !stored.at(-1).content)) stored.pop();
    return stored;
  } catch {
    return [];
  }
}

function saveConversation() {
  try { localStorage.setItem(CONVERSATION, JSON.stringify(messages)); } catch { /* storage full or disabled */ }
}

function atBottom() {
  return window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 24;
}

function followEnd() {
  if (following) window.scrollTo(0, document.documentElement.scrollHeight);
}

window.addEventListener("scroll", () => { following = atBottom(); }, { passive: true });

// Settings survive a reload (this browser only).
for (const [box, key] of [[systemBox, "llama3.system"], [keyBox, "llama3.apiKey"],
                          [$("temperature"), "llama3.temperature"], [$("max-tokens"), "llama3.maxTokens"]]) {
  box.value = localStorage.getItem(key) ?? box.value;
  box.addEventListener("input", () => localStorage.setItem(key, box.value));
}
keyBox.addEventListener("change", loadModel);

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyBox.value) h["Authorization"] = "Bearer " + keyBox.value;
  return h;
}

async function errorMessage(response) {
  try { return (await response.json()).error.message; } catch { return response.status + " " + response.statusText; }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      $("model").textContent = "API key needed";
      $("settings").open = true;
      keyBox.focus();
      return;
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    modelName = (await response.json()).data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = "server unreachable";
    statusLine.textContent = String(e.message || e);
  }
}

function show(div, role, text) {
  if (role === "assistant") div.replaceChildren(renderMarkdown(text));
  else div.textContent = text;  // what the user typed, as typed
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  show(div, role, text);
  conversation.appendChild(div);
  followEnd();
  return div;
}

function render() {
  conversation.replaceChildren();
  if (!messages.length) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = "Start a conversation below.";
    conversation.appendChild(p);
  }
  for (const m of messages) bubble(m.role, m.content);
}

function setBusy(busy) {
  sendButton.disabled = busy;
  stopButton.hidden = !busy;
  sendButton.hidden = busy;
}

// Yields the JSON payload of each `data:` event until `[DONE]`.
async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  if (!modelName) await loadModel();
  if (!modelName) return;
  const chat = messages;  // "New chat" may replace `messages` while this reply streams
  const reply = { role: "assistant", content: "" };
  chat.push({ role: "user", content: text });
  if (chat.length === 1) conversation.replaceChildren();
  following = true;
  bubble("user", text);
  const div = bubble("assistant", "");
  div.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  statusLine.textContent = "";
  const started = performance.now();
  let finish = null;
  try {
    const system = systemBox.value.trim();
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: modelName,
        messages: system ? [{ role: "system", content: system }, ...chat] : chat,
        stream: true,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
        frequency_penalty: Number($("frequency-penalty").value),
        presence_penalty: Number($("presence-penalty").value),
        repeat_penalty: Number($("repeat-penalty").value),
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    chat.push(reply);
    for await (const chunk of serverSentEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice.delta.content) {
        reply.content += choice.delta.content;
        show(div, "assistant", reply.content);
        if (chat === messages) saveConversation();
        followEnd();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    const seconds = (performance.now() - started) / 1000;
    statusLine.textContent = finish === "length" ? "Stopped at the token limit." : `Replied in ${seconds.toFixed(1)} s.`;
  } catch (e) {
    if (e.name === "AbortError") {
      statusLine.textContent = "Stopped.";
    } else {
      div.classList.add("error");
      div.textContent = reply.content + (reply.content ? "\n\n" : "") + "Error: " + (e.message || e);
    }
  } finally {
    div.classList.remove("streaming");
    if (!reply.content) {  // nothing came back: forget the question too, so user and assistant turns keep alternating
      chat.splice(chat.at(-1) === reply ? -2 : -1);
      if (!div.classList.contains("error")) div.remove();
    }
    if (chat === messages) saveConversation();
    followEnd();
    controller = null;
    setBusy(false);
    input.focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

stopButton.addEventListener("click", () => controller && controller.abort());

$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  saveConversation();
  statusLine.textContent = "";
  render();
  input.focus();
});

render();
loadModel();
input.focus();
