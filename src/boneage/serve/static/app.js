// boneage web page: upload a radiograph, show the API's record, offer the HTML and JSON reports.
// Plain JavaScript, no external resources. The page only displays what POST /api/v1/predict returns.
"use strict";

(function () {
  const API = "/api/v1";
  // Fields the web API adds to the `boneage predict` record; the JSON download leaves them out.
  const WEB_ONLY = ["report_id", "report_html_url", "report_json_url", "heatmap_png_base64"];
  const $ = (id) => document.getElementById(id);

  const form = $("predict-form");
  const input = $("image");
  const dropzone = $("dropzone");
  const submit = $("submit");
  let previewUrl = null;
  let jsonUrl = null;

  // Signed numbers with a real minus sign; "+" only where a sign is meaningful.
  function signed(value, digits) {
    const text = Math.abs(value).toFixed(digits);
    return (value > 0 ? "+" : value < 0 && Number(text) !== 0 ? "\u2212" : "") + text;
  }

  function fmtMonths(value, withSign) {
    if (value === null || value === undefined) return "\u2014";
    return (withSign ? signed(value, 1) : Number(value).toFixed(1)) + " months";
  }

  function setText(id, text) {
    $(id).textContent = text;
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function chosenFile() {
    return input.files && input.files.length ? input.files[0] : null;
  }

  function fileChosen() {
    const file = chosenFile();
    setText("file-name", file ? "Selected: " + file.name : "");
    dropzone.classList.toggle("has-file", Boolean(file));
    showError("");
  }

  input.addEventListener("change", fileChosen);
  ["dragenter", "dragover"].forEach((type) =>
    dropzone.addEventListener(type, (event) => {
      event.preventDefault();
      dropzone.classList.add("dragging");
    })
  );
  ["dragleave", "drop"].forEach((type) =>
    dropzone.addEventListener(type, () => dropzone.classList.remove("dragging"))
  );
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      fileChosen();
    }
  });

  function chronologicalAge() {
    const years = $("age-years").value.trim();
    const months = $("age-months").value.trim();
    if (!years && !months) return null;
    for (const [label, value, max] of [["years", years, 25], ["months", months, 11]]) {
      if (value && !/^\d+$/.test(value)) throw new Error("Chronological age: " + label + " must be a whole number.");
      if (value && Number(value) > max) throw new Error("Chronological age: " + label + " must be at most " + max + ".");
    }
    return (years || "0") + "y" + (months || "0") + "m";
  }

  function render(record, file) {
    setText("bone-age-text", record.bone_age_text);
    setText("bone-age-months", Number(record.bone_age_months).toFixed(1));
    const badge = $("category");
    const certainty = (record.category_certainty || "").split(":")[0];
    badge.textContent = record.category
      ? record.category + (certainty === "borderline" || certainty === "indeterminate" ? " (" + certainty + ")" : "")
      : "no comparison";
    badge.title = record.category_certainty || "";
    badge.className = "badge " + (record.category || "none");
    setText("summary", record.summary || "");
    setText(
      "chronological-age",
      record.chronological_age_months === null
        ? "not given"
        : record.chronological_age_text + " (" + fmtMonths(record.chronological_age_months) + ")" +
          (record.chronological_age_source === "dicom" ? " \u00b7 from the DICOM header" : "")
    );
    setText("difference", fmtMonths(record.difference_months, true));
    setText(
      "z-score",
      record.z_score === null
        ? "\u2014"
        : signed(record.z_score, 2) +
          (record.sd_months !== null ? "  (SD " + record.sd_months.toFixed(1) + " months)" : "")
    );
    const sexNames = { M: "male", F: "female" };
    const sources = { cli: "as given", dicom: "from the DICOM header", unknown: "both sexes averaged" };
    setText("sex-used", (sexNames[record.sex] || "unknown") + " \u00b7 " + (sources[record.sex_source] || ""));
    setText(
      "mae",
      record.model_mae_months === null
        ? "not recorded in the checkpoint"
        : "mean absolute error " + record.model_mae_months.toFixed(1) + " months on held-out validation images"
    );
    const iv = record.bone_age_interval_months;
    setText(
      "interval",
      iv === null
        ? "none (the checkpoint has no calibration residuals)"
        : iv[0].toFixed(0) + "\u2013" + iv[1].toFixed(0) + " months, " +
          (100 * record.interval_level).toFixed(0) + "% prediction interval (split conformal)"
    );
    const nr = record.normal_range_months;
    setText(
      "normal-range",
      nr === null
        ? "\u2014 (needs the chronological age and sex)"
        : nr[0].toFixed(0) + "\u2013" + nr[1].toFixed(0) + " months (chronological age \u00b1 2 SD; " +
          record.reference_standard + ")" + (record.category_certainty ? "; " + record.category_certainty : "")
    );
    setText(
      "ood",
      record.ood_score === null
        ? "no out-of-distribution check in this model"
        : "passed: feature distance " + record.ood_score.toFixed(2) + " \u00d7 the refusal threshold"
    );
    setText(
      "models",
      record.architectures.join(", ") + " \u00d7" + record.models.length +
        " \u00b7 test-time augmentation " + (record.tta ? "on" : "off")
    );

    const list = $("warning-list");
    list.replaceChildren(...record.warnings.map((w) => {
      const li = document.createElement("li");
      li.textContent = w;
      return li;
    }));
    $("warnings").hidden = record.warnings.length === 0;

    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = null;
    const browserImage = file && /^image\/(png|jpeg)$/.test(file.type);
    const preview = $("upload-preview");
    if (browserImage) {
      previewUrl = URL.createObjectURL(file);
      preview.src = previewUrl;
    } else {
      preview.removeAttribute("src");
    }
    preview.hidden = !browserImage;
    $("no-preview").hidden = Boolean(browserImage);

    const heatmap = $("heatmap");
    if (record.heatmap_png_base64) {
      heatmap.src = "data:image/png;base64," + record.heatmap_png_base64;
      heatmap.hidden = false;
    } else {
      heatmap.removeAttribute("src");
      heatmap.hidden = true;
    }

    const stem = (record.file || "radiograph").replace(/\.[^.]*$/, "") || "radiograph";
    const html = $("download-html");
    html.href = record.report_html_url;
    html.setAttribute("download", stem + "_boneage.html");
    const plain = {};
    for (const [key, value] of Object.entries(record)) {
      if (!WEB_ONLY.includes(key)) plain[key] = value;
    }
    if (jsonUrl) URL.revokeObjectURL(jsonUrl);
    jsonUrl = URL.createObjectURL(new Blob([JSON.stringify(plain, null, 2) + "\n"], { type: "application/json" }));
    const json = $("download-json");
    json.href = jsonUrl;
    json.setAttribute("download", stem + "_boneage.json");

    $("placeholder").hidden = true;
    $("result-body").hidden = false;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showError("");
    const file = chosenFile();
    if (!file) {
      showError("Choose a radiograph first (PNG, JPEG or DICOM).");
      return;
    }
    let age;
    try {
      age = chronologicalAge();
    } catch (err) {
      showError(err.message);
      return;
    }
    const data = new FormData();
    data.append("image", file, file.name);
    const sex = form.querySelector("input[name=sex]:checked");
    if (sex && sex.value) data.append("sex", sex.value);
    if (age) data.append("chronological_age", age);
    if ($("right-hand").checked) data.append("right_hand", "true");

    submit.disabled = true;
    setText("status", "Analysing " + file.name + "\u2026");
    document.body.classList.add("busy");
    try {
      const response = await fetch(API + "/predict", { method: "POST", body: data });
      let body = null;
      try {
        body = await response.json();
      } catch (err) {
        body = null;
      }
      if (!response.ok) {
        const detail = body && typeof body.detail === "string" ? body.detail : response.statusText;
        throw new Error("Not analysed (" + response.status + "): " + detail);
      }
      render(body, file);
      setText("status", "Done: bone age " + body.bone_age_text + ".");
    } catch (err) {
      setText("status", "");
      showError(err.message || String(err));
    } finally {
      submit.disabled = false;
      document.body.classList.remove("busy");
    }
  });

  fetch(API + "/model")
    .then((r) => (r.ok ? r.json() : Promise.reject(new Error(r.statusText))))
    .then((m) => {
      const mae = m.model_mae_months === null ? "validation MAE not recorded" :
        "validation MAE " + m.model_mae_months.toFixed(1) + " months";
      setText("model-info", "Model: " + m.architectures.join(", ") + " \u00d7" + m.members + " \u00b7 " + mae +
        " \u00b7 TTA " + (m.tta ? "on" : "off"));
    })
    .catch(() => setText("model-info", "Model information unavailable"));
})();
