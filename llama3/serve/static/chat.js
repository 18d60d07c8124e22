// The chat page: keeps the conversation in memory, streams replies from /v1/chat/completions (server-sent
// events over fetch), and stops a reply by aborting its request (the server then cancels the generation).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation"), input = $("input"), sendButton = $("send"), stopButton = $("stop");
const systemBox = $("system"), keyBox = $("api-key"), statusLine = $("status");

let modelName = null;
let messages = [];      // [{role, content}] of this chat, without the system prompt
let controller = null;  // AbortController of the reply being streamed

// Settings survive a reload (this browser only).
for (const [box, key] of [[systemBox, "llama3.system"], [keyBox, "llama3.apiKey"]]) {
  box.value = localStorage.getItem(key) || "";
  box.addEventListener("change", () => localStorage.setItem(key, box.value));
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

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  div.textContent = text;  // text only: model output is never interpreted as HTML
  conversation.appendChild(div);
  div.scrollIntoView({ block: "end" });
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
  chat.push({ role: "user", content: text });
  if (chat.length === 1) conversation.replaceChildren();
  bubble("user", text);
  const reply = { role: "assistant", content: "" };
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
    for await (const chunk of serverSentEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (choice.delta.content) {
        reply.content += choice.delta.content;
        div.textContent = reply.content;
        div.scrollIntoView({ block: "end" });
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
    if (reply.content) {
      chat.push(reply);
    } else {  // nothing came back: forget the question too, so user and assistant turns keep alternating
      chat.pop();
      if (!div.classList.contains("error")) div.remove();
    }
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
  statusLine.textContent = "";
  render();
  input.focus();
});

render();
loadModel();
input.focus();
