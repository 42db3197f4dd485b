"use strict";
// The CAPI feature explorer. Reads the JSON in #explorer-data (written by capi_backbones/viz/explore.py) and draws
// everything in this page: no network. window.capiExplorer exposes the state for tests and benchmarks.
(function () {
  const $ = (id) => document.getElementById(id);
  const data = JSON.parse($("explorer-data").textContent);
  $("explorer-data").remove(); // the parsed copy is enough (up to about 90 MB of text)
  const photos = data.photos;
  const models = data.models;
  const nModels = models.length;
  const letters = ["A", "B"];
  const NO_MAP_GREY = 96; // PCA tiles without a map (the threshold keeps too few patches)

  // ---- decoding --------------------------------------------------------------------------------------------------
  function base64Bytes(text) {
    const binary = atob(text);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    return bytes;
  }
  const halfTable = new Float32Array(65536); // every float16 bit pattern -> its value
  for (let h = 0; h < 65536; h++) {
    const sign = h & 0x8000 ? -1 : 1;
    const exponent = (h >> 10) & 31;
    const fraction = h & 1023;
    let value;
    if (exponent === 0) value = fraction * 2 ** -24;
    else if (exponent === 31) value = fraction ? NaN : Infinity;
    else value = (1 + fraction / 1024) * 2 ** (exponent - 15);
    halfTable[h] = sign * value;
  }
  function decodeHalf(text) {
    const halves = new Uint16Array(base64Bytes(text).buffer); // little-endian, as numpy '<f2' wrote them
    const out = new Float32Array(halves.length);
    for (let i = 0; i < halves.length; i++) out[i] = halfTable[halves[i]];
    return out;
  }

  const offsets = [];
  let nPatches = 0;
  for (const photo of photos) {
    offsets.push(nPatches);
    nPatches += photo.h * photo.w;
  }
  const features = models.map((m) => decodeHalf(m.features));
  const dims = models.map((m) => m.approximation.dims);
  for (const m of models) delete m.features; // the decoded copy is enough

  // coolwarm: linear interpolation between the anchors (as capi_backbones.viz.coolwarm), 256 entries
  const colormap = new Uint8Array(256 * 3);
  for (let i = 0; i < 256; i++) {
    const position = (i / 255) * (data.colormap.length - 1);
    const lo = Math.min(Math.floor(position), data.colormap.length - 2);
    const t = position - lo;
    for (let c = 0; c < 3; c++) {
      colormap[i * 3 + c] = Math.round(data.colormap[lo][c] * (1 - t) + data.colormap[lo + 1][c] * t);
    }
  }

  // ---- state -----------------------------------------------------------------------------------------------------
  const state = {
    photo: -1, row: 0, col: 0, // the query patch
    similarities: models.map(() => null), // Float32Array(nPatches) per model
    ranges: models.map(() => [-1, 1]),
    hovered: null, // [photo, row, col] under the cursor
    lastComputeMs: null, lastPaintMs: null, lastInputToPaintMs: null, updates: 0,
  };
  const pcaCache = new Map();
  const cards = [];

  // ---- page frame ------------------------------------------------------------------------------------------------
  document.title = data.title;
  $("title").textContent = data.title;
  $("summary").textContent = `${photos.length} photos · ` +
    models.map((m, i) => (nModels > 1 ? `${letters[i]}: ` : "") + m.name).join(" · ");
  $("about").textContent = `Made by capi-backbones ${data.version}. Similarity: cosine of the patch features ` +
    "(the encoder's normalised patch tokens) to the selected patch. PCA map: components 1-3 of a PCA of the patch " +
    "features as RGB, whitened and sign-fixed (positive skewness); the foreground threshold keeps the patches whose " +
    "first component is above T standard deviations and refits the PCA on them (background black). Order by pooled " +
    "similarity: cosine of the pooled embeddings (the predictor's global representation) to the selected photo. " +
    `Limits of one page: ${data.limits.photos} photos, ${data.limits.patches} patches per model, ` +
    `${data.limits.storedValues} stored feature values.`;
  $("approximation").textContent = models.map((m, i) => {
    const a = m.approximation;
    const kept = a.dims === a.featureDim ? `all ${a.featureDim} dimensions` :
      `${a.dims} of ${a.featureDim} dimensions (projection on the top singular directions)`;
    const bound = a.bound === null ? "no bound holds for a projection" :
      `at most ${a.bound.toPrecision(2)} by construction`;
    return `${nModels > 1 ? letters[i] + ": " : ""}features stored as unit-normalised ${a.encoding}, ${kept}; the ` +
      `cosine similarities shown differ from the float32 ones by ${bound}; largest difference measured on ` +
      `${a.queries} query patches against all patches: ${a.measuredMaxError.toPrecision(2)}.`;
  }).join(" ");
  $("help-toggle").addEventListener("click", () => {
    const help = $("help");
    help.hidden = !help.hidden;
    $("help-toggle").setAttribute("aria-expanded", String(!help.hidden));
  });

  const thresholdInput = $("threshold");
  thresholdInput.max = String(data.thresholds.length - 1);
  const order = $("order");
  order.add(new Option("input order", "input"));
  models.forEach((m, i) => {
    if (m.pooledSimilarity) order.add(new Option(`pooled similarity${nModels > 1 ? " (" + letters[i] + ")" : ""}`, String(i)));
  });

  // colour bars, one per model
  const colorbars = models.map((m, i) => {
    const box = document.createElement("span");
    box.className = "colorbar";
    box.innerHTML = `<span class="name"></span><span class="lo"></span><span class="marker-wrap">` +
      `<canvas width="256" height="1"></canvas><span class="marker"></span></span><span class="hi"></span>`;
    box.querySelector(".name").textContent = nModels > 1 ? `${letters[i]}` : "cosine";
    const canvas = box.querySelector("canvas");
    const image = canvas.getContext("2d").createImageData(256, 1);
    for (let k = 0; k < 256; k++) {
      image.data.set([colormap[k * 3], colormap[k * 3 + 1], colormap[k * 3 + 2], 255], k * 4);
    }
    canvas.getContext("2d").putImageData(image, 0, 0);
    $("colorbars").appendChild(box);
    return box;
  });

  // ---- cards -----------------------------------------------------------------------------------------------------
  function makeTile(photo, index, kind, model) {
    const tile = document.createElement("div");
    tile.className = `tile ${kind}`;
    const img = document.createElement("img");
    img.src = photo.src;
    img.alt = kind === "similarity" ? photo.name : "";
    img.draggable = false;
    const canvas = document.createElement("canvas");
    canvas.width = photo.w;
    canvas.height = photo.h;
    const mark = document.createElement("div");
    mark.className = "mark";
    const hoverMark = document.createElement("div"); // the patch under the cursor, on every tile of its photo
    hoverMark.className = "hover-mark";
    const label = document.createElement("span");
    label.className = "model";
    label.textContent = (nModels > 1 ? letters[model] + " · " : "") + (kind === "similarity" ? "similarity" : "PCA");
    const note = document.createElement("span");
    note.className = "note";
    note.hidden = true;
    tile.append(img, canvas, mark, hoverMark, label, note);
    tile.addEventListener("click", (event) => {
      const [row, col] = patchAt(tile, photo, event);
      select(index, row, col, event.timeStamp);
      cards[index].element.focus({ preventScroll: true });
    });
    tile.addEventListener("mousemove", (event) => {
      const [row, col] = patchAt(tile, photo, event);
      state.hovered = [index, row, col];
      if ($("hover").checked && (state.photo !== index || state.row !== row || state.col !== col)) {
        select(index, row, col, event.timeStamp);
      } else showHovered();
    });
    tile.addEventListener("mouseleave", () => {
      state.hovered = null;
      showHovered();
    });
    return { tile, canvas, context: canvas.getContext("2d"), mark, hoverMark, note, model, kind };
  }

  function patchAt(tile, photo, event) {
    const box = tile.getBoundingClientRect();
    const col = Math.min(photo.w - 1, Math.max(0, Math.floor(((event.clientX - box.left) / box.width) * photo.w)));
    const row = Math.min(photo.h - 1, Math.max(0, Math.floor(((event.clientY - box.top) / box.height) * photo.h)));
    return [row, col];
  }

  photos.forEach((photo, index) => {
    const element = document.createElement("article");
    element.className = "card";
    element.tabIndex = 0;
    element.dataset.index = String(index);
    element.setAttribute("aria-label", `${photo.name}, ${photo.h} x ${photo.w} patches`);
    const caption = document.createElement("div");
    caption.className = "caption";
    caption.innerHTML = `<span class="name"></span><span class="rank"></span>`;
    caption.querySelector(".name").textContent = photo.name;
    caption.querySelector(".name").title = photo.name;
    const similarityRow = document.createElement("div");
    similarityRow.className = "tiles";
    const pcaRow = document.createElement("div");
    pcaRow.className = "tiles";
    pcaRow.style.marginTop = "6px";
    const tiles = [];
    for (let m = 0; m < nModels; m++) {
      const t = makeTile(photo, index, "similarity", m);
      similarityRow.appendChild(t.tile);
      tiles.push(t);
    }
    for (let m = 0; m < nModels; m++) {
      const t = makeTile(photo, index, "pca", m);
      pcaRow.appendChild(t.tile);
      tiles.push(t);
    }
    element.append(caption, similarityRow, pcaRow);
    element.addEventListener("keydown", (event) => onKey(event, index));
    $("grid").appendChild(element);
    cards.push({ element, tiles, rank: caption.querySelector(".rank"), pcaRow, similarityRow });
  });

  // ---- similarity ------------------------------------------------------------------------------------------------
  function computeSimilarities(m, query) {
    const f = features[m];
    const d = dims[m];
    const out = new Float32Array(nPatches);
    const q = f.subarray(query * d, query * d + d);
    for (let i = 0, o = 0; i < nPatches; i++, o += d) {
      let s = 0;
      for (let k = 0; k < d; k++) s += f[o + k] * q[k];
      out[i] = s;
    }
    return out;
  }

  function select(photo, row, col, inputTime) {
    const start = performance.now();
    state.photo = photo;
    state.row = row;
    state.col = col;
    const query = offsets[photo] + row * photos[photo].w + col;
    for (let m = 0; m < nModels; m++) {
      const sims = computeSimilarities(m, query);
      state.similarities[m] = sims;
      let lo = Infinity, hi = -Infinity;
      for (let i = 0; i < nPatches; i++) {
        if (i === query) continue;
        if (sims[i] < lo) lo = sims[i];
        if (sims[i] > hi) hi = sims[i];
      }
      state.ranges[m] = nPatches > 1 ? [lo, hi] : [-1, 1];
    }
    drawSimilarities();
    drawMarks();
    applyOrder();
    showHovered();
    state.lastComputeMs = performance.now() - start;
    const updates = ++state.updates;
    requestAnimationFrame(() => setTimeout(() => { // after the next frame is painted
      if (updates !== state.updates) return;
      const now = performance.now();
      state.lastPaintMs = now - start;
      state.lastInputToPaintMs = inputTime === undefined ? null : now - inputTime;
      state.painted = updates;
    }, 0));
  }

  function clearSelection() {
    state.photo = -1;
    state.similarities = models.map(() => null);
    state.updates++;
    drawSimilarities();
    drawMarks();
    applyOrder();
    showHovered();
  }

  function range(m) {
    return $("scale").value === "fixed" ? [-1, 1] : state.ranges[m];
  }

  function drawSimilarities() {
    const opacity = Number($("opacity").value) / 100;
    cards.forEach((card, index) => {
      const photo = photos[index];
      for (const t of card.tiles) {
        if (t.kind !== "similarity") continue;
        const sims = state.similarities[t.model];
        t.canvas.style.opacity = String(opacity);
        if (!sims) {
          t.context.clearRect(0, 0, photo.w, photo.h);
          continue;
        }
        const [lo, hi] = range(t.model);
        const span = hi > lo ? hi - lo : 1;
        const image = t.context.createImageData(photo.w, photo.h);
        for (let p = 0, i = offsets[index]; p < photo.w * photo.h; p++, i++) {
          const k = Math.max(0, Math.min(255, Math.round(((sims[i] - lo) / span) * 255)));
          image.data[p * 4] = colormap[k * 3];
          image.data[p * 4 + 1] = colormap[k * 3 + 1];
          image.data[p * 4 + 2] = colormap[k * 3 + 2];
          image.data[p * 4 + 3] = 255;
        }
        t.context.putImageData(image, 0, 0);
      }
    });
    colorbars.forEach((bar, m) => {
      const [lo, hi] = state.similarities[m] ? range(m) : [NaN, NaN];
      bar.querySelector(".lo").textContent = Number.isNaN(lo) ? "" : lo.toFixed(3);
      bar.querySelector(".hi").textContent = Number.isNaN(hi) ? "" : hi.toFixed(3);
    });
  }

  function pcaLayer(m, mode, index) {
    const key = `${m}/${mode}/${index}`;
    if (!pcaCache.has(key)) {
      const layer = models[m].pca[mode][index];
      pcaCache.set(key, { rgb: base64Bytes(layer.rgb), errors: layer.errors });
    }
    return pcaCache.get(key);
  }

  function drawPca() {
    const mode = $("pca-mode").value;
    const index = Number(thresholdInput.value);
    const threshold = data.thresholds[index];
    $("threshold-value").textContent = threshold === null ? "off" : `T = ${threshold.toFixed(2)}`;
    cards.forEach((card, photoIndex) => {
      const photo = photos[photoIndex];
      for (const t of card.tiles) {
        if (t.kind !== "pca") continue;
        const layer = pcaLayer(t.model, mode, index);
        const error = layer.errors[photoIndex];
        const image = t.context.createImageData(photo.w, photo.h);
        const base = offsets[photoIndex] * 3;
        for (let p = 0; p < photo.w * photo.h; p++) { // no map: the tile is grey, and its note says why
          image.data[p * 4] = error ? NO_MAP_GREY : layer.rgb[base + p * 3];
          image.data[p * 4 + 1] = error ? NO_MAP_GREY : layer.rgb[base + p * 3 + 1];
          image.data[p * 4 + 2] = error ? NO_MAP_GREY : layer.rgb[base + p * 3 + 2];
          image.data[p * 4 + 3] = 255;
        }
        t.context.putImageData(image, 0, 0);
        t.note.hidden = !error;
        t.note.textContent = error ? "no map: " + error.split(/(?<=\.)\s/)[0] : "";
        t.note.title = error || "";
      }
    });
  }

  function drawMarks() {
    const size = tileSize();
    cards.forEach((card, index) => {
      const photo = photos[index];
      card.element.classList.toggle("selected", index === state.photo);
      for (const t of card.tiles) {
        if (index !== state.photo) {
          t.mark.style.display = "none";
          continue;
        }
        const cell = size / photo.w;
        Object.assign(t.mark.style, {
          display: "block", left: `${state.col * cell}px`, top: `${state.row * cell}px`,
          width: `${cell}px`, height: `${cell}px`,
        });
      }
    });
  }

  function tileSize() {
    return Number($("tile-size").value);
  }

  function applyOrder() {
    const grid = $("grid");
    const by = order.value;
    let sequence = photos.map((_, i) => i);
    if (by !== "input" && state.photo >= 0) {
      const row = models[Number(by)].pooledSimilarity[state.photo];
      sequence.sort((a, b) => row[b] - row[a] || a - b);
    }
    const focused = document.activeElement;
    sequence.forEach((index, rank) => {
      grid.appendChild(cards[index].element);
      const parts = models.map((m, k) => (m.pooledSimilarity && state.photo >= 0 ?
        `${nModels > 1 ? letters[k] + " " : ""}${m.pooledSimilarity[state.photo][index].toFixed(3)}` : null))
        .filter((x) => x !== null);
      cards[index].rank.textContent = state.photo >= 0 && parts.length ?
        `${by !== "input" ? "#" + (rank + 1) + " · " : ""}pooled cos ${parts.join(" / ")}` : "";
    });
    if (focused && focused.classList && focused.classList.contains("card")) focused.focus({ preventScroll: true });
    state.order = sequence;
  }

  let hoverMarked = null; // the card whose tiles show the hover mark
  function markHovered() {
    if (hoverMarked) for (const t of hoverMarked.tiles) t.hoverMark.style.display = "none";
    hoverMarked = null;
    if (!state.hovered) return;
    const [p, r, c] = state.hovered;
    const cell = tileSize() / photos[p].w;
    hoverMarked = cards[p];
    for (const t of hoverMarked.tiles) {
      Object.assign(t.hoverMark.style, {
        display: "block", left: `${c * cell}px`, top: `${r * cell}px`, width: `${cell}px`, height: `${cell}px`,
      });
    }
  }

  function showHovered() {
    markHovered();
    const status = $("status");
    colorbars.forEach((bar) => { bar.querySelector(".marker").style.display = "none"; });
    if (state.photo < 0) {
      status.textContent = "Click a patch of any photo (or focus a photo with Tab and press Enter; arrow keys move the patch).";
      return;
    }
    let text = `Query: ${photos[state.photo].name}, patch (row ${state.row}, col ${state.col}).`;
    if (state.hovered) {
      const [p, r, c] = state.hovered;
      const i = offsets[p] + r * photos[p].w + c;
      const values = models.map((_, m) => state.similarities[m][i]);
      text += ` Under the cursor: ${photos[p].name} (row ${r}, col ${c}): cosine ` +
        values.map((v, m) => `${nModels > 1 ? letters[m] + " " : ""}${v.toFixed(3)}`).join(", ") + ".";
      values.forEach((v, m) => {
        const [lo, hi] = range(m);
        const t = Math.max(0, Math.min(1, (v - lo) / (hi > lo ? hi - lo : 1)));
        const marker = colorbars[m].querySelector(".marker");
        marker.style.display = "block";
        marker.style.left = `${t * 220 - 1}px`;
      });
      state.hoveredValues = values;
    }
    status.textContent = text;
  }

  // ---- keyboard --------------------------------------------------------------------------------------------------
  function onKey(event, index) {
    const photo = photos[index];
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    if (event.key === "Enter" || event.key === " ") {
      if (state.photo !== index) select(index, photo.h >> 1, photo.w >> 1, event.timeStamp);
    } else if (event.key in moves) {
      if (state.photo !== index) select(index, photo.h >> 1, photo.w >> 1, event.timeStamp);
      else {
        const [dr, dc] = moves[event.key];
        const row = Math.max(0, Math.min(photo.h - 1, state.row + dr));
        const col = Math.max(0, Math.min(photo.w - 1, state.col + dc));
        select(index, row, col, event.timeStamp);
      }
    } else if (event.key === "Escape") {
      clearSelection();
    } else return;
    event.preventDefault();
  }

  // ---- controls --------------------------------------------------------------------------------------------------
  function setTileSize() {
    document.documentElement.style.setProperty("--tile", `${tileSize()}px`);
    drawMarks();
  }
  thresholdInput.addEventListener("input", drawPca);
  $("pca-mode").addEventListener("change", drawPca);
  $("opacity").addEventListener("input", drawSimilarities);
  $("scale").addEventListener("change", () => { drawSimilarities(); showHovered(); });
  order.addEventListener("change", applyOrder);
  $("tile-size").addEventListener("input", setTileSize);

  if (nModels > 1 || photos.length > 24) $("tile-size").value = "176";
  setTileSize();
  drawPca();
  drawSimilarities();

  window.capiExplorer = {
    ready: true,
    data,
    state,
    offsets,
    nPatches,
    select,
    clearSelection,
    similarities: (m) => (state.similarities[m] ? Array.from(state.similarities[m]) : null),
    pcaPixels: (m, photo) => { // RGBA of the PCA canvas of a photo, as drawn
      const t = cards[photo].tiles.find((x) => x.kind === "pca" && x.model === m);
      return Array.from(t.context.getImageData(0, 0, photos[photo].w, photos[photo].h).data);
    },
  };
  document.body.dataset.ready = "true";
})();
