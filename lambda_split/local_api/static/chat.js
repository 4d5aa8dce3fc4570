// The chat page of `lambda-split local`: plain JavaScript, no build step.
// It keeps the conversation here and sends all of it each turn; the endpoint continues its
// trunk session when the turn extends the previous one. Answers stream over server-sent events,
// read with fetch + ReadableStream; the last choice chunk's `lambda_split` object gives the stats.
"use strict";

const $ = (id) => document.getElementById(id);
const messages = [];
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem("lambda-split-key");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function needKey() {
  $("key-row").hidden = false;
  showError("This endpoint needs its API key: enter it above and send again.");
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function setState(state) {
  document.body.dataset.state = state;
  $("send").disabled = state === "streaming";
  $("stop").disabled = state !== "streaming";
}

async function loadInfo() {
  const reply = await fetch("/v1/local/info", { headers: headers() });
  if (reply.status === 401) { needKey(); return; }
  if (!reply.ok) { showError("Cannot read this endpoint's setup (HTTP " + reply.status + ")."); return; }
  const info = await reply.json();
  $("model").textContent = info.model;
  $("security").textContent = info.security;
  // With --head-depth, each conversation's head stops at its own depth (drawn once under random).
  const depth = info.head_depth == null ? ""
    : " (head depth " + info.head_depth + (info.head_depth === "random" ? " in " + info.head_depths.join(":") : "") + ")";
  $("split").textContent = info.split.join(":") + depth;
  $("wire").textContent = info.wire;
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = "message " + role;
  item.textContent = text;
  $("transcript").appendChild(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function formatBytes(n) {
  if (n >= 1048576) return (n / 1048576).toFixed(2) + " MiB";
  if (n >= 1024) return (n / 1024).toFixed(1) + " KiB";
  return n + " B";
}

function showStats(stats, usage) {
  const parts = [
    stats.tokens_per_s.toFixed(1) + " tokens/s",
    "first token " + (stats.time_to_first_token_s * 1000).toFixed(0) + " ms",
    "wire " + formatBytes(stats.bytes_sent) + " sent, " + formatBytes(stats.bytes_received) + " received",
  ];
  if (usage) parts.push(usage.completion_tokens + " tokens (prompt " + usage.prompt_tokens + ", reused " + stats.reused_tokens + ")");
  $("stats").textContent = parts.join(" · ");
}

// Yields the JSON payload of each `data:` event; stops at [DONE].
async function* events(body) {
  const reader = body.getReader();
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
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function send(prompt) {
  showError("");
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem("lambda-split-key", key);
  messages.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const answer = addMessage("assistant", "");
  answer.dataset.done = "false";
  answer.dataset.chunks = "0";
  setState("streaming");
  controller = new AbortController();
  let text = "";
  let finished = false;
  try {
    const body = {
      model: $("model").textContent,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: Number($("max-tokens").value) || 256,
      temperature: Number($("temperature").value),
    };
    const reply = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (reply.status === 401) { needKey(); throw new Error(""); }
    if (!reply.ok) {
      const error = await reply.json().catch(() => ({}));
      throw new Error((error.error && error.error.message) || "HTTP " + reply.status);
    }
    let stats = null;
    for await (const chunk of events(reply.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.delta.content) {
          text += choice.delta.content;
          answer.textContent = text;
          answer.dataset.chunks = String(Number(answer.dataset.chunks) + 1);
        }
        if (choice.finish_reason) { finished = true; answer.dataset.finish = choice.finish_reason; }
      }
      if (chunk.lambda_split) stats = chunk.lambda_split;
      if (chunk.usage && stats) showStats(stats, chunk.usage);
    }
    if (stats && !finished) showStats(stats, null);
  } catch (error) {
    if (error.name !== "AbortError" && error.message) showError(error.message);
  } finally {
    answer.dataset.done = "true";
    controller = null;
    if (text) {
      messages.push({ role: "assistant", content: text });  // a stopped answer too, as it is shown
      if (!finished) answer.classList.add("cut");
    } else {
      messages.pop();  // nothing came back: this turn is not part of the conversation
      answer.remove();
    }
    setState("idle");
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || controller) return;
  $("prompt").value = "";
  send(prompt);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  messages.length = 0;
  $("transcript").replaceChildren();
  $("stats").textContent = "No answer yet.";
  showError("");
});

loadInfo().catch((error) => showError(error.message)).finally(() => setState("idle"));
