// Upload page: send the chosen/dropped file to POST /v1/predict?heatmap=true, show the answer.
"use strict";

const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", Boolean(isError));
}

function percent(p) {
  return (100 * p).toFixed(1) + "%";
}

function ruleName(rule) {
  const sensitivity = /^sensitivity(\d+)$/.exec(rule);  // sensitivity95 ... sensitivity99
  if (sensitivity) return sensitivity[1] + "% sensitivity on validation";
  return { youden: "Youden's J on validation", site: "chosen on this site's labelled sample" }[rule] || rule;
}

function show(file, r) {
  $("file-name").textContent = file.name;
  $("prob").textContent = percent(r.p_pneumonia);
  $("bar-fill").style.width = percent(r.p_pneumonia);
  $("bar-threshold").style.left = percent(r.threshold);
  const label = $("label");
  label.textContent = r.label;
  label.className = "label " + r.label.toLowerCase();
  const three = Boolean(r.probabilities);  // a three-class run: normal / bacterial / viral
  $("classes").hidden = !three;
  if (three) {
    for (const k of ["normal", "bacterial", "viral"]) $("p-" + k).textContent = percent(r.probabilities[k]);
  }
  $("threshold-line").textContent =
    "Threshold " + r.threshold.toFixed(3) + " (" + ruleName(r.threshold_rule) + "): " +
    (three
      ? "pneumonia when the probability is at or above it; then BACTERIAL when p(bacterial) / p(pneumonia) " +
        "is at or above " + r.bacterial_vs_viral_threshold.toFixed(3) + ", else VIRAL."
      : "PNEUMONIA when the probability is at or above it.");
  const m = r.model;
  $("model-line").textContent =
    "Model: " + m.backbone + " (" + m.image_size + "×" + m.image_size + " input) from run “" + m.run + "”, " +
    "running on " + m.runtime + ".";
  $("heatmap-caption").textContent = r.heatmap_empty
    ? "Grad-CAM: no region raised the pneumonia score for this image"
    : "Grad-CAM: regions that raised the pneumonia score";
  $("input-img").src = "data:image/png;base64," + r.input_png;
  $("heatmap-img").src = "data:image/png;base64," + r.heatmap_png;
  $("result").hidden = false;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
  } catch (e) { /* not JSON */ }
  return response.status + " " + response.statusText;
}

async function analyse(file) {
  if (!file) return;
  setStatus("Analysing " + file.name + " …");
  $("drop").classList.add("busy");
  const form = new FormData();
  form.append("file", file, file.name);
  const token = $("token").value.trim();  // a server bound beyond localhost asks for one
  const headers = token ? { Authorization: "Bearer " + token } : {};
  try {
    const response = await fetch("/v1/predict?heatmap=true", { method: "POST", body: form, headers });
    if (response.status === 401) {
      $("result").hidden = true;
      $("token-box").hidden = false;
      $("token").focus();
      setStatus("This server needs its access token: enter it below, then choose the file again.", true);
      return;
    }
    if (!response.ok) {
      $("result").hidden = true;
      setStatus("Could not analyse " + file.name + ": " + (await errorText(response)), true);
      return;
    }
    show(file, await response.json());
    setStatus("");
  } catch (e) {
    setStatus("The server could not be reached: " + e.message, true);
  } finally {
    $("drop").classList.remove("busy");
  }
}

function init() {
  const drop = $("drop");
  const input = $("file");
  input.addEventListener("change", () => analyse(input.files[0]));
  ["dragenter", "dragover"].forEach((type) =>
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); }));
  ["dragleave", "drop"].forEach((type) =>
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
  drop.addEventListener("drop", (e) => analyse(e.dataTransfer.files[0]));
}

document.addEventListener("DOMContentLoaded", init);
