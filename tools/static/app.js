// The search page: pick or drop an image, POST its bytes to api/search, show the top k.
// Plain JavaScript, no build step, nothing loaded from elsewhere. Server data is only ever set
// as text (textContent) or as an attribute, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;
let lastFile = null;
let queryUrl = null;

function imageUrl(path) {
  return "images/" + path.split("/").map(encodeURIComponent).join("/");
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function loadInfo() {
  try {
    const response = await fetch("api/info");
    info = await response.json();
  } catch (error) {
    $("catalog").textContent = "the server does not answer: " + error;
    return;
  }
  $("catalog").textContent = `${info.count} images · ${info.search} search · model ${info.fingerprint}`;
  $("k").max = info.max_k;
  $("k").value = info.k;
}

function chosenK() {
  const k = Number.parseInt($("k").value, 10);
  const max = info ? info.max_k : 100;
  return Number.isFinite(k) ? Math.min(Math.max(k, 1), max) : (info ? info.k : 10);
}

async function search(file) {
  lastFile = file;
  showError("");
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  $("query").src = queryUrl;
  $("query").hidden = false;
  $("drop-text").textContent = file.name || "query image";
  const k = chosenK();
  $("k").value = k;
  $("status").textContent = "searching…";
  document.body.dataset.state = "searching";
  let response, data;
  try {
    response = await fetch(`api/search?k=${k}`, {
      method: "POST",
      body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    data = await response.json();
  } catch (error) {
    data = { error: response ? `HTTP ${response.status}` : String(error) };
  }
  if (!response || !response.ok) {
    $("status").textContent = "";
    showError(data && data.error ? data.error : `HTTP ${response && response.status}`);
    $("results").replaceChildren();
    document.body.dataset.state = "error";
    return;
  }
  render(data.results);
  $("status").textContent = `${data.results.length} results`;
  document.body.dataset.state = "done";
}

function render(results) {
  const figures = results.map((result) => {
    const figure = document.createElement("figure");
    figure.className = "result";
    figure.dataset.rank = result.rank;
    figure.dataset.score = result.score;
    figure.dataset.path = result.path;
    if (info && info.images) {
      const img = document.createElement("img");
      img.alt = result.path;
      img.addEventListener("error", () => img.classList.add("missing"));
      img.src = imageUrl(result.path);
      figure.append(img);
    } else {
      const box = document.createElement("div");
      box.className = "noimage";
      box.textContent = "no --images";
      figure.append(box);
    }
    const caption = document.createElement("figcaption");
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${result.rank}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = result.score.toFixed(3);
    const item = document.createElement("span");
    item.className = "item";
    item.textContent = result.item || "(no item)";
    const path = document.createElement("span");
    path.className = "path";
    path.textContent = result.path;
    path.title = result.path;
    caption.append(rank, score, item, path);
    figure.append(caption);
    return figure;
  });
  $("results").replaceChildren(...figures);
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", () => {
    if ($("file").files.length) search($("file").files[0]);
  });
  $("k").addEventListener("change", () => {
    if (lastFile) search(lastFile);
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) search(file);
  });
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("file").click();
  });
  loadInfo();
}

setUp();
