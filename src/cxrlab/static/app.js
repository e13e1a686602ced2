"use strict";
// cxrlab page: uploads to /api/predict, renders one .result card per file, fills the model card.
(function () {
  const $ = (id) => document.getElementById(id);

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  const pct = (p) => (p === null || p === undefined ? "n/a" : (100 * p).toFixed(1) + "%");
  const num = (x, d) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(d === undefined ? 3 : d));
  const ci = (v) => (Array.isArray(v) && v[0] !== null && v[1] !== null ? " (95% CI " + num(v[0]) + "–" + num(v[1]) + ")" : "");
  const isDicom = (f) => /\.(dcm|dicom)$/i.test(f.name) || f.type === "application/dicom";

  function renderResult(r, file) {
    const card = el("div", "result");
    card.appendChild(el("h3", "filename", r.filename));
    if (r.error) {
      card.classList.add("failed");
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
    if (r.positive_label && p !== null && p !== undefined) {
      card.appendChild(el("div", "score", "P(" + r.positive_label + ") = " + pct(p)));
      const bar = el("div", "bar"), fill = el("span");
      fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(1) + "%";
      bar.appendChild(fill);
      card.appendChild(bar);
    } else {
      const top = Object.entries(r.scores || {}).sort((a, b) => b[1] - a[1])[0];
      card.appendChild(el("div", "score", top ? "P(" + top[0] + ") = " + pct(top[1]) : "n/a"));
    }
    card.appendChild(el("div", "verdict", r.verdict));
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
      fig.append(img, el("figcaption", null, "heatmap overlay"));
      images.appendChild(fig);
    }
    if (images.children.length) card.appendChild(images);
    return card;
  }

  async function upload(fileList) {
    const files = Array.from(fileList || []);
    if (!files.length) return;
    const status = $("status"), results = $("results");
    status.className = "status";
    status.textContent = "Analysing " + files.length + " file" + (files.length > 1 ? "s" : "") + "…";
    const form = new FormData();
    files.forEach((f) => form.append("files", f, f.name));
    let body, resp;
    try {
      resp = await fetch("/api/predict", { method: "POST", body: form });
      body = await resp.json().catch(() => ({}));
    } catch (e) {
      status.className = "status error";
      status.textContent = "Upload failed: " + e;
      return;
    }
    results.textContent = "";
    if (!resp.ok) {
      status.className = "status error";
      const d = body.detail;
      status.textContent = "Error " + resp.status + ": " + (typeof d === "string" ? d : JSON.stringify(d || resp.statusText));
      return;
    }
    const byName = new Map(files.map((f) => [f.name, f]));
    (body.results || []).forEach((r, i) => results.appendChild(renderResult(r, files[i] || byName.get(r.filename))));
    status.textContent = "Done: " + (body.results || []).length + " result(s).";
  }

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
    if (t.auc !== undefined) row(dl, "Test ROC AUC", num(t.auc) + ci(t.auc_ci), "metric-auc");
    if (t.sensitivity !== undefined) row(dl, "Test sensitivity", pct(t.sensitivity) + ci(t.sensitivity_ci), "metric-sensitivity");
    if (t.specificity !== undefined) row(dl, "Test specificity", pct(t.specificity) + ci(t.specificity_ci), "metric-specificity");
    if (t.accuracy !== undefined) row(dl, "Test accuracy", pct(t.accuracy) + ci(t.accuracy_ci));
    if (t.macro_auc !== undefined) row(dl, "Test macro AUC", num(t.macro_auc));
    if (t.n !== undefined) row(dl, "Test images", t.n + (t.n_positive !== undefined ? " (" + t.n_positive + " positive)" : ""));
    row(dl, "WHO target", t.who_verdict || "not evaluated", "who who-verdict");
    const op = m.operating_point;
    if (op) {
      row(dl, "Operating point", "rule " + op.rule + ", threshold " + num(op.threshold) +
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
    loadModelCard();
  });
})();
