"use strict";
// cxrlab page: uploads to /api/predict in batches within /api/limits, renders one .result card per file,
// offers the results as CSV, JSON and a ZIP of heatmaps, and fills the model card.
(function () {
  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  const isNum = (x) => x !== null && x !== undefined && Number.isFinite(Number(x));
  const pct = (p) => (isNum(p) ? (100 * p).toFixed(1) + "%" : "n/a");
  const num = (x, d) => (isNum(x) ? Number(x).toFixed(d === undefined ? 3 : d) : "n/a");
  // one unit style: a proportion and its interval both in %, an AUC and its interval both as 0-1 numbers
  const ciPct = (v) => (Array.isArray(v) && isNum(v[0]) && isNum(v[1]) ? " (95% CI " + (100 * v[0]).toFixed(1) + "–" + pct(v[1]) + ")" : "");
  const ciNum = (v) => (Array.isArray(v) && isNum(v[0]) && isNum(v[1]) ? " (95% CI " + num(v[0]) + "–" + num(v[1]) + ")" : "");
  const isDicom = (f) => /\.(dcm|dicom)$/i.test(f.name) || f.type === "application/dicom";
  const mib = (n) => (n < 1048576 ? Math.round(n / 1024) + " KiB" : (n / 1048576).toFixed(n >= 10485760 ? 0 : 1) + " MiB");

  // Multipart framing per file (boundary, headers, the name); what the server counts against its request limit.
  const PART_OVERHEAD = 1024, REQUEST_OVERHEAD = 4096;
  const FALLBACK_LIMITS = { max_files: 32, max_upload_bytes: 32 * 1048576, max_request_bytes: 128 * 1048576 };
  let limits = null;
  const state = { results: [], busy: false };

  async function getLimits() {
    if (limits) return limits;
    try {
      const resp = await fetch("/api/limits");
      if (resp.ok) limits = await resp.json();
    } catch (e) { /* an older server: fall back to the defaults */ }
    limits = limits || FALLBACK_LIMITS;
    $("limits-note").textContent = "Up to " + mib(limits.max_upload_bytes) + " per file; any number of files " +
      "(sent " + limits.max_files + " at a time).";
    return limits;
  }

  // Files -> batches that each fit max_files and max_request_bytes; a file over the per-file limit is not sent.
  function batches(files, lim) {
    const out = [], tooLarge = [];
    let cur = [], bytes = REQUEST_OVERHEAD;
    for (const f of files) {
      if (f.size > lim.max_upload_bytes) { tooLarge.push(f); continue; }
      const cost = f.size + PART_OVERHEAD + 3 * f.name.length;
      if (cur.length && (cur.length >= lim.max_files || bytes + cost > lim.max_request_bytes)) {
        out.push(cur);
        cur = [];
        bytes = REQUEST_OVERHEAD;
      }
      cur.push(f);
      bytes += cost;
    }
    if (cur.length) out.push(cur);
    return { batches: out, tooLarge };
  }

  function failed(file, message) {
    return { filename: file.name, label: null, scores: {}, positive_score: null, verdict: null, error: message };
  }

  function gateLines(r) {
    const lines = [];
    if (r.ood === false) {  // the server sends 1 - the chest score; the model card speaks of the chest score
      lines.push(["gate-chest", "ok", "Chest X-ray check: passed" + (isNum(r.ood_score) && isNum(r.ood_threshold) ?
        " (chest score " + num(1 - r.ood_score, 2) + " ≥ " + num(1 - r.ood_threshold, 2) + ")" : "")]);
    }
    if (r.shift === true) {
      lines.push(["gate-shift", "warn", "Like the training images: no (shift score " + num(r.shift_score, 1) +
        " > " + num(r.shift_threshold, 1) + ")"]);
    } else if (r.shift === false) {
      lines.push(["gate-shift", "ok", "Like the training images: yes (shift score " + num(r.shift_score, 1) +
        " ≤ " + num(r.shift_threshold, 1) + ")"]);
    }
    return lines;
  }

  function renderResult(r, file) {
    const card = el("div", "result");
    card.appendChild(el("h3", "filename", r.filename));
    if (r.error) {
      card.classList.add("failed");
      card.appendChild(el("div", "label", "not analysed"));
      card.appendChild(el("p", "error-msg", r.error));
      return card;
    }
    if (r.ood) {  // not a chest X-ray: no score, no bar, only why
      card.classList.add("refused");
      card.appendChild(el("div", "label", "unknown"));
      card.appendChild(el("div", "ood-warning", "Not a chest X-ray: " + (r.ood_reason || "refused") +
        ". No score is given."));
      return card;
    }
    if (r.label && r.label === r.positive_label) card.classList.add("positive");
    card.appendChild(el("div", "label", r.label === null ? "no answer" : r.label));
    const p = r.positive_score;
    if (r.positive_label && isNum(p)) {
      card.appendChild(el("div", "score", "P(" + r.positive_label + ") = " + pct(p)));
      const bar = el("div", "bar"), fill = el("span", "fill");
      fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(1) + "%";
      bar.appendChild(fill);
      if (isNum(r.threshold)) {
        const mark = el("span", "mark");
        mark.style.left = Math.max(0, Math.min(100, 100 * r.threshold)).toFixed(1) + "%";
        mark.title = "threshold " + pct(r.threshold);
        bar.appendChild(mark);
      }
      card.appendChild(bar);
    } else {
      const top = Object.entries(r.scores || {}).sort((a, b) => b[1] - a[1])[0];
      card.appendChild(el("div", "score", top ? "P(" + top[0] + ") = " + pct(top[1]) : "n/a"));
    }
    // the server's verdict, with the threshold in the unit of the score above it
    const binary = Object.keys(r.scores || {}).length === 2 && isNum(p) && isNum(r.threshold);
    card.appendChild(el("div", "verdict", binary ? (p >= r.threshold ? "above" : "below") + " the threshold of " +
      pct(r.threshold) + " -> " + r.label : r.verdict));
    const gates = gateLines(r);
    if (gates.length) {
      const ul = el("ul", "gates");
      gates.forEach(([cls, kind, text]) => ul.appendChild(el("li", cls + " " + kind, text)));
      card.appendChild(ul);
    }
    if (r.shift) {
      card.appendChild(el("div", "shift-warning",
        "Warning: unlike the training images (shift score " + num(r.shift_score, 1) + " > " +
        num(r.shift_threshold, 1) + "). The film was scored; read its score with more caution."));
    }
    const scores = el("div", "scores");
    scores.textContent = Object.entries(r.scores || {}).map(([k, v]) => k + " " + pct(v)).join(" · ");
    card.appendChild(scores);
    const images = el("div", "images");
    if (file && !isDicom(file) && file.type.startsWith("image/")) {
      const fig = el("figure"), img = el("img", "original");
      img.alt = "uploaded image";
      img.src = URL.createObjectURL(file);
      fig.append(img, el("figcaption", null, "image"));
      images.appendChild(fig);
    }
    if (r.heatmap_png) {
      const fig = el("figure", "heatmap-figure"), img = el("img", "heatmap");
      img.alt = "heatmap: regions that raised the score";
      img.src = "data:image/png;base64," + r.heatmap_png;
      const cap = el("figcaption", null, "heatmap overlay · "), link = el("a", "heatmap-download", "PNG");
      link.href = img.src;
      link.download = heatmapName(r.filename);
      cap.appendChild(link);
      fig.append(img, cap);
      images.appendChild(fig);
    }
    if (images.children.length) card.appendChild(images);
    return card;
  }

  function heatmapName(filename) {
    return String(filename).replace(/\.[^.]*$/, "").replace(/[^\w.-]+/g, "_") + "_heatmap.png";
  }

  // One batch; a 413 for the whole request (limits changed under us) splits it; 503 waits Retry-After, thrice.
  async function send(batch, heatmap) {
    for (let attempt = 0; ; attempt++) {
      const form = new FormData();
      batch.forEach((f) => form.append("files", f, f.name));
      let resp, body;
      try {
        resp = await fetch("/api/predict" + (heatmap ? "" : "?heatmap=0"), { method: "POST", body: form });
        body = await resp.json().catch(() => ({}));
      } catch (e) {
        return batch.map((f) => failed(f, "upload failed: " + e));
      }
      if (resp.ok) return body.results || [];
      const d = body.detail, detail = typeof d === "string" ? d : JSON.stringify(d || resp.statusText);
      if (resp.status === 413 && batch.length > 1 && !batch.some((f) => detail.includes(f.name))) {
        const half = Math.ceil(batch.length / 2);
        return (await send(batch.slice(0, half), heatmap)).concat(await send(batch.slice(half), heatmap));
      }
      if (resp.status === 503 && attempt < 3) {
        const wait = Number(resp.headers.get("Retry-After")) || 5;
        await new Promise((ok) => setTimeout(ok, 1000 * wait));
        continue;
      }
      // every file of the batch failed: the server says why, one reason per file, joined by "; "
      const reasons = detail.split("; ");
      return batch.map((f, i) => failed(f, "Error " + resp.status + ": " +
        (reasons.length === batch.length ? reasons[i] : detail)));
    }
  }

  async function upload(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    if (state.busy) {
      $("status").textContent = "Still analysing the files dropped before; drop these again when it is done.";
      return;
    }
    state.busy = true;
    const status = $("status"), results = $("results"), progress = $("progress");
    status.className = "status";
    results.textContent = "";
    state.results = [];
    $("downloads").hidden = true;
    try {
      const lim = await getLimits();
      const plan = batches(files, lim);
      const show = (r, f) => { state.results.push(r); results.appendChild(renderResult(r, f)); };
      plan.tooLarge.forEach((f) => show(failed(f, f.name + " is larger than the limit of " +
        mib(lim.max_upload_bytes) + " per file (the server's --max-upload-mb); it was not sent"), f));
      const total = files.length - plan.tooLarge.length;
      progress.max = Math.max(1, total);
      progress.value = 0;
      progress.hidden = total === 0;
      let done = 0;
      for (let b = 0; b < plan.batches.length; b++) {
        const batch = plan.batches[b];
        status.textContent = "Analysing " + total + " file" + (total > 1 ? "s" : "") +
          (plan.batches.length > 1 ? " in " + plan.batches.length + " batches: batch " + (b + 1) + " of " +
            plan.batches.length : "") + "… (" + done + " done)";
        const answers = await send(batch, true);
        answers.forEach((r, i) => show(r, batch[i]));
        done += batch.length;
        progress.value = done;
      }
      const errors = state.results.filter((r) => r.error).length;
      status.textContent = "Done: " + state.results.length + " result(s)" +
        (errors ? ", " + errors + " not analysed" : "") + ".";
      if (errors === state.results.length) status.className = "status error";
    } finally {
      progress.hidden = true;
      $("downloads").hidden = state.results.length === 0;
      state.busy = false;
    }
  }

  // ----------------------------------------------------------------- downloads (all made here, offline)
  const CSV_COLUMNS = ["filename", "label", "positive_label", "positive_score", "threshold", "verdict",
    "chest_check", "ood_score", "ood_threshold", "ood_reason", "shift", "shift_score", "shift_threshold",
    "warning", "error"];

  function csvCell(v) {
    const s = v === null || v === undefined ? "" : String(v);
    return /[",\n\r]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  function toCsv(rows) {
    const lines = [CSV_COLUMNS.join(",")];
    rows.forEach((r) => {
      const chest = r.ood === true ? "refused" : r.ood === false ? "passed" : "";
      lines.push(CSV_COLUMNS.map((k) => csvCell(k === "chest_check" ? chest : r[k])).join(","));
    });
    return lines.join("\n") + "\n";
  }

  function save(blob, name) {
    const a = el("a");
    a.href = URL.createObjectURL(blob);
    a.download = name;
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  }

  const CRC_TABLE = (() => {
    const t = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      t[n] = c >>> 0;
    }
    return t;
  })();

  function crc32(bytes) {
    let c = 0xffffffff;
    for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  }

  // A ZIP of stored (uncompressed) entries: PNGs are compressed already, and no library is needed.
  function zip(entries) {
    const enc = new TextEncoder(), parts = [], central = [];
    let offset = 0;
    entries.forEach(({ name, data }) => {
      const nameBytes = enc.encode(name), crc = crc32(data);
      const local = new DataView(new ArrayBuffer(30));
      [[0, 0x04034b50, 4], [4, 20, 2], [6, 0x0800, 2], [14, crc, 4], [18, data.length, 4], [22, data.length, 4],
        [26, nameBytes.length, 2]].forEach(([at, v, n]) => (n === 4 ? local.setUint32(at, v, true) : local.setUint16(at, v, true)));
      const head = new DataView(new ArrayBuffer(46));
      [[0, 0x02014b50, 4], [4, 20, 2], [6, 20, 2], [8, 0x0800, 2], [16, crc, 4], [20, data.length, 4],
        [24, data.length, 4], [28, nameBytes.length, 2], [42, offset, 4]].forEach(([at, v, n]) => (n === 4 ? head.setUint32(at, v, true) : head.setUint16(at, v, true)));
      parts.push(local, nameBytes, data);
      central.push(head, nameBytes);
      offset += 30 + nameBytes.length + data.length;
    });
    const size = central.reduce((s, p) => s + p.byteLength, 0), end = new DataView(new ArrayBuffer(22));
    [[0, 0x06054b50, 4], [8, entries.length, 2], [10, entries.length, 2], [12, size, 4], [16, offset, 4]]
      .forEach(([at, v, n]) => (n === 4 ? end.setUint32(at, v, true) : end.setUint16(at, v, true)));
    return new Blob([...parts, ...central, end], { type: "application/zip" });
  }

  function heatmapZip(rows) {
    const used = new Set(), entries = [];
    rows.filter((r) => r.heatmap_png).forEach((r) => {
      let name = heatmapName(r.filename), n = 1;
      while (used.has(name)) name = heatmapName(r.filename).replace(/_heatmap\.png$/, "-" + (++n) + "_heatmap.png");
      used.add(name);
      const bin = atob(r.heatmap_png), data = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) data[i] = bin.charCodeAt(i);
      entries.push({ name, data });
    });
    return zip(entries);
  }

  function setupDownloads() {
    const stamp = () => new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-");
    $("download-csv").addEventListener("click", () =>
      save(new Blob([toCsv(state.results)], { type: "text/csv" }), "cxrlab-results-" + stamp() + ".csv"));
    $("download-json").addEventListener("click", () =>
      save(new Blob([JSON.stringify({ results: state.results }, null, 1)], { type: "application/json" }),
        "cxrlab-results-" + stamp() + ".json"));
    $("download-heatmaps").addEventListener("click", () => save(heatmapZip(state.results), "cxrlab-heatmaps-" + stamp() + ".zip"));
  }

  // ----------------------------------------------------------------- model card
  function row(dl, key, value, cls) {
    dl.appendChild(el("dt", null, key));
    dl.appendChild(el("dd", cls || null, value));
  }

  async function loadModelCard() {
    const box = $("model-card-body");
    let m;
    try {
      const resp = await fetch("/api/model");
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      m = await resp.json();
    } catch (e) {
      box.textContent = "Model card unavailable (" + e + ").";
      return;
    }
    box.textContent = "";
    const dl = el("dl");
    dl.id = "model-card-fields";
    const bb = m.backbone || {};
    row(dl, "Backbone", (bb.id || bb.name || "?") + " (" + m.input_size + " px)", "backbone");
    row(dl, "Labels", (m.labels || []).join(", "));
    if (m.created_by) row(dl, "Created by", m.created_by);
    const td = m.training_data || {};
    if (td.counts) {
      const counts = Object.entries(td.counts).map(([k, v]) => k + ": " + v).join(", ");
      row(dl, "Training data", (td.image_dir_name ? td.image_dir_name + " — " : "") + counts, "training-data");
    }
    const n = (m.metrics || {}).n;
    if (n) row(dl, "Split", Object.entries(n).map(([k, v]) => k + " " + v).join(", "));
    const t = (m.metrics || {}).test || {};
    if (t.auc !== undefined) row(dl, "Test ROC AUC", num(t.auc) + ciNum(t.auc_ci), "metric-auc");
    if (t.sensitivity !== undefined) row(dl, "Test sensitivity", pct(t.sensitivity) + ciPct(t.sensitivity_ci), "metric-sensitivity");
    if (t.specificity !== undefined) row(dl, "Test specificity", pct(t.specificity) + ciPct(t.specificity_ci), "metric-specificity");
    if (t.accuracy !== undefined) row(dl, "Test accuracy", pct(t.accuracy) + ciPct(t.accuracy_ci), "metric-accuracy");
    if (t.macro_auc !== undefined) row(dl, "Test macro AUC", num(t.macro_auc));
    if (t.n !== undefined) row(dl, "Test images", t.n + (t.n_positive !== undefined ? " (" + t.n_positive + " positive)" : ""));
    row(dl, "WHO target", t.who_verdict || "not evaluated", "who who-verdict" + (t.who_status ? " who-" + t.who_status : ""));
    if (t.sample_warning) row(dl, "Warning", t.sample_warning, "sample-warning");
    const op = m.operating_point;
    if (op) {
      row(dl, "Operating point", "rule " + op.rule + ", threshold " + pct(op.threshold) +
        " (validation sensitivity " + pct(op.sensitivity) + ", specificity " + pct(op.specificity) + ")" +
        (op.note ? " — " + op.note : ""), "operating-point");
    }
    const cal = m.calibration;
    if (cal) row(dl, "Calibration", cal.method + (cal.temperature !== undefined ? " (T = " + num(cal.temperature) + ")" : ""), "calibration");
    if (m.chest_check) row(dl, "Chest X-ray check", "refuses pictures scored below " + num(m.chest_check.threshold, 2) +
      " as a frontal chest X-ray (colour and blank pictures too)");
    if (m.ood) row(dl, "Shift warning", "shift scores above " + num(m.ood.threshold, 1));
    box.appendChild(dl);
    if (m.intended_use) $("intended-use").textContent = m.intended_use.charAt(0).toUpperCase() + m.intended_use.slice(1) + ".";
  }

  document.addEventListener("DOMContentLoaded", () => {
    const zone = $("dropzone"), input = $("file-input");
    zone.addEventListener("click", (e) => { if (e.target !== input && e.target.tagName !== "LABEL") input.click(); });
    zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
    input.addEventListener("change", () => { upload(input.files); input.value = ""; });
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("dragover"); }));
    ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.remove("dragover"); }));
    zone.addEventListener("drop", (e) => upload(e.dataTransfer.files));
    setupDownloads();
    getLimits();
    loadModelCard();
  });
})();
