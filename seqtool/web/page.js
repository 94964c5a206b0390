// The page talks to the same JSON API as any client: GET /info, POST /translate. No build step, no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const phrases = (id) => $(id).value.split(",").map((p) => p.trim()).filter(Boolean);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;  // text, never HTML: outputs are shown as they are
  return node;
}

async function loadCard() {
  try {
    const card = await (await fetch("info")).json();
    $("model").textContent = `${card.architecture}, ${card.parameters.toLocaleString()} parameters`;
    const d = card.config.decoding;
    $("beam").value = d.beam_size;
    $("nbest").value = d.nbest;
    $("attention-choice").hidden = card.config.model.context !== "attention";
  } catch (e) {
    $("model").textContent = "model card unavailable";
  }
}

function request(lines) {
  const prefix = $("prefix").value, constraints = phrases("constraints"), avoid = phrases("avoid");
  const controlled = prefix || constraints.length || avoid.length;
  const options = {beam_size: Number($("beam").value), nbest: Number($("nbest").value), sample: $("sample").checked,
                   attention: $("attention").checked};
  if (options.sample) {
    Object.assign(options, {temperature: Number($("temperature").value), top_p: Number($("top_p").value),
                            seed: Number($("seed").value)});
  }
  return {lines: lines.map((text) => (controlled ? {text, prefix, constraints, avoid} : text)), options};
}

function heatmap(t) {
  const table = el("table", "attention"), head = table.createTHead().insertRow();
  head.appendChild(el("th"));
  for (const piece of t.src_pieces) head.appendChild(el("th", "", piece));
  const body = table.createTBody();
  t.attention.forEach((weights, i) => {
    const row = body.insertRow();
    row.appendChild(el("th", "", i < t.pieces.length ? t.pieces[i] : "</s>"));
    for (const w of weights) {
      const cell = row.insertCell();
      cell.style.background = `rgba(30, 90, 200, ${w})`;
      cell.title = w.toFixed(3);
    }
  });
  return table;
}

function show(lines, translations) {
  const out = $("out");
  out.replaceChildren();
  translations.forEach((t, i) => {
    const box = el("div", "result");
    box.appendChild(el("p", "source", lines[i]));
    box.appendChild(el("p", "text", t.text));
    if (t.nbest.length > 1) {
      const list = el("ol");
      for (const h of t.nbest) {
        const item = el("li", "", h.text + " ");
        item.appendChild(el("span", "score", `(${h.score.toFixed(3)})`));
        list.appendChild(item);
      }
      box.appendChild(list);
    }
    if (t.attention) box.appendChild(heatmap(t));
    out.appendChild(box);
  });
}

function fail(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

async function post(path, body, button) {
  // The API's answer, or null after showing its error (or the network's) as the message.
  $("error").hidden = true;
  button.disabled = true;
  try {
    const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                        body: JSON.stringify(body)});
    const data = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
    if (response.ok) return data;
    fail(data.error || `${response.status} ${response.statusText}`);
  } catch (e) {
    fail(`the server did not answer: ${e.message}`);
  } finally {
    button.disabled = false;
  }
  return null;
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const lines = $("lines").value.split("\n").filter((l) => l.trim());
  if (!lines.length) return fail("type a line to translate");
  const data = await post("translate", request(lines), $("go"));
  if (data) show(lines, data.translations);
});

$("poem-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = {heads: $("heads").value.trim(), chars: Number($("chars").value), tones: $("tones").checked};
  const data = await post("poem", body, $("write"));
  if (!data) return;
  const box = el("div", "result poem");
  box.appendChild(el("p", "source", data.heads));
  for (const line of data.lines) box.appendChild(el("p", "text", line));
  $("out").replaceChildren(box);
});

async function loadHealth() {
  try {
    $("poem-form").hidden = !(await (await fetch("health")).json()).poems;  // served with --poem-first
  } catch (e) {
    // no poem form then
  }
}

loadCard();
loadHealth();
