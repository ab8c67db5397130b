// The "try it" form of a model page: build a /v1 predict request, send it with the key the
// user typed, draw the answer. Everything from the server is drawn with textContent, never as
// HTML; the page's CSP allows this file and no inline script.
"use strict";

(function () {
  const form = document.getElementById("try");
  if (!form) return;
  const shape = JSON.parse(form.dataset.shape);
  const task = form.dataset.task;
  const unit = form.dataset.unit;
  // A multi-output regressor's unit per target name (an answer's keys may come in another
  // order: JavaScript puts integer-like keys first).
  const targetNames = JSON.parse(form.dataset.targetNames || "[]");
  const targetUnits = JSON.parse(form.dataset.units || "[]");
  const unitOf = new Map(targetNames.map((n, i) => [n, targetUnits[i] || ""]));
  // The classes in the manifest's order (each label's first data-key-chars characters): an
  // answer's probabilities are drawn in it (their Object.entries put '10' and '2' before
  // 'zebra'). Maps, not objects, hold what a name keys: a class called "__proto__" or
  // "constructor" is a name like any other.
  const labels = JSON.parse(form.dataset.labels || "[]");
  const keyChars = Number(form.dataset.keyChars);
  const result = document.getElementById("result");
  const formError = document.getElementById("form-error");

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  function fmt(x) {
    if (x === null || x === undefined) return "unbounded";
    return Number(x).toPrecision(4);
  }

  // A level as the API gave it: rounded to 0.1, 0.9996 read "100 %", which a clinician reads
  // as certainty (review PG2).
  function percent(level) {
    return String(Number((level * 100).toPrecision(15)));  // 15 digits: no float noise, no rounding up
  }

  function nest(flat, dims) {
    if (dims.length <= 1) return flat;
    const step = flat.length / dims[0];
    const out = [];
    for (let i = 0; i < dims[0]; i++) out.push(nest(flat.slice(i * step, (i + 1) * step), dims.slice(1)));
    return out;
  }

  // --- the drawing grid (image models) -------------------------------------------------
  // Each cell holds a value from low to high (data-value) and is shaded by it: black is high,
  // as ink on paper. A click or Enter/Space cycles low, half, high; an uploaded image sets
  // every cell (scaled to the grid, its darkness as the value).
  const grid = document.getElementById("grid");
  const cells = grid ? Array.from(grid.querySelectorAll(".cell")) : [];
  const low = grid ? Number(grid.dataset.low) : 0;
  const high = grid ? Number(grid.dataset.high) : 1;
  function valueOf(cell) {
    return Number(cell.dataset.value);
  }
  function setValue(cell, v) {
    cell.dataset.value = String(v);
    const ink = (v - low) / (high - low || 1);
    const grey = Math.round(255 * (1 - ink));
    cell.style.backgroundColor = "rgb(" + grey + "," + grey + "," + grey + ")"; // CSSOM: allowed
    const word = v <= low ? "empty" : v >= high ? "full" : v === (low + high) / 2 ? "half" : String(v);
    cell.setAttribute("aria-label", cell.getAttribute("aria-label").replace(/: [^:]+$/, ": " + word));
  }
  function cycle(cell) {
    const v = valueOf(cell), mid = (low + high) / 2;
    setValue(cell, v < mid ? mid : v < high ? high : low);
  }
  async function upload(file) {
    const rows = Number(grid.dataset.rows), cols = Number(grid.dataset.cols);
    let bitmap;
    try {
      bitmap = await createImageBitmap(file); // from the file's bytes: no URL is loaded
    } catch (err) {
      formError.textContent = "could not read " + file.name + " as an image; use a PNG or JPEG";
      return;
    }
    const canvas = document.createElement("canvas");
    canvas.width = cols;
    canvas.height = rows;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#ffffff"; // transparent parts count as paper
    ctx.fillRect(0, 0, cols, rows);
    ctx.drawImage(bitmap, 0, 0, cols, rows);
    const px = ctx.getImageData(0, 0, cols, rows).data;
    cells.forEach((cell, i) => {
      const lum = 0.299 * px[4 * i] + 0.587 * px[4 * i + 1] + 0.114 * px[4 * i + 2];
      // to 1e-4 (0.01 was coarser than a byte's steps on a 0-1 model), kept inside the range
      const v = Math.round(1e4 * (low + (high - low) * (1 - lum / 255))) / 1e4;
      setValue(cell, Math.min(high, Math.max(low, v)));
    });
    formError.textContent = "";
  }
  if (grid) {
    const cols = Number(grid.dataset.cols);
    grid.style.gridTemplateColumns = "repeat(" + cols + ", 1fr)"; // CSSOM: allowed by the CSP
    cells.forEach((cell, i) => {
      cell.addEventListener("click", () => cycle(cell));
      cell.addEventListener("keydown", (e) => {
        const moves = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -cols, ArrowDown: cols };
        if (!(e.key in moves)) return;
        const next = cells[i + moves[e.key]];
        if (!next) return;
        e.preventDefault();
        cell.tabIndex = -1;
        next.tabIndex = 0;
        next.focus();
      });
    });
    document.getElementById("clear").addEventListener("click", () => cells.forEach((c) => setValue(c, low)));
    const picker = document.getElementById("upload");
    picker.addEventListener("change", () => picker.files.length && upload(picker.files[0]));
  }

  // --- errors ----------------------------------------------------------------------------
  const fields = Array.from(form.querySelectorAll("input[data-feature]"));
  function clearErrors() {
    formError.textContent = "";
    for (const span of form.querySelectorAll(".field-error")) span.replaceChildren();
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  }
  // The field an API message is about, and where in the message its name is: [field, start,
  // end] or null. The API says "instance 0, feature 'age' = 500 is outside ..." (the name
  // whole, however long: a field holds its first 2,000 characters and its length) or, for
  // unnamed features, "instance 0, element 1 = 50 ...". Names are compared whole, by
  // position and length, not by a pattern (one stopped at the apostrophe of "patient's age").
  function fieldOf(message) {
    const element = /^instance \d+, element (\d+)\b/.exec(message);
    if (element) {
      const input = fields.find((i) => i.dataset.index === element[1] && i.dataset.feature === "element " + element[1]);
      return input ? [input, -1, -1] : null;
    }
    const lead = /^instance \d+, feature '/.exec(message);
    return lead ? named(message, lead[0].length) : null;
  }
  // The one field whose name is at `start` of `message`, and where the name ends.
  function named(message, start) {
    // After the name: "' = <value> " or "': ". Every field that fits is a candidate ("a" and
    // "a' = b" both start "feature 'a' = b' = 50"; the value check tells them apart). Names
    // alike in their first 2,000 characters and length cannot be told apart: then no field.
    const found = fields.filter((input) => {
      const end = start + Number(input.dataset.length);
      return message.startsWith(input.dataset.feature, start) && /^'( = [-+]?(\d|inf|nan)|: )/i.test(message.slice(end, end + 8));
    });
    if (found.length !== 1) return null;
    return [found[0], start, start + Number(found[0].dataset.length)];
  }
  function put(id, input, message, start, end) {
    // The message as text; a feature's name in it in its own <bdi> (a right-to-left mark in
    // the name reversed the rest of the message).
    const span = document.getElementById(id);
    if (start >= 0) span.append(message.slice(0, start), el("bdi", message.slice(start, end)), message.slice(end));
    else span.textContent = message;
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
  // Each option's own messages: the API's ("invalid request: parameters.seed: ...", "confidence
  // level 1.5 is outside (0, 1) ...") and the page's ("the seed is a whole number ...").
  const OPTIONS = {
    samples: /^(invalid request: parameters\.)?samples\b/,
    seed: /^(invalid request: parameters\.seed\b|seed must be|the seed\b)/,
    confidence: /^(invalid request: parameters\.confidence\b|confidence levels? |give between \d+ and \d+ confidence levels)/,
  };
  // An error goes next to what it is about: a feature's field (by its index), an option's
  // field, the text box ("instance 0: ..."); anything else above the result.
  function showError(message, index) {
    const audio = document.getElementById("audio");
    const found = index === undefined ? fieldOf(message) : [fields[index], -1, -1];
    const option = Object.keys(OPTIONS).find((id) => OPTIONS[id].test(message));
    const text = document.getElementById("text");
    if (found) {
      put("e-" + found[0].dataset.index, found[0], message, found[1], found[2]);
    } else if (option) {
      put(option + "-e", document.getElementById(option), message, -1, -1);
    } else if (text && /^(instance \d+: |write some text|the text is )/.test(message)) {
      put("e-text", text, message, -1, -1);
    } else if (audio && /^(instance \d+: |choose a WAV file|the file is )/.test(message)) {
      put("e-audio", audio, message, -1, -1);
    } else {
      formError.textContent = message;
    }
  }

  // --- the request -----------------------------------------------------------------------
  const DECIMAL = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/;
  // A file's bytes in base64, in slices (String.fromCharCode of a whole clip overflows the
  // stack of arguments).
  function base64(buffer) {
    const bytes = new Uint8Array(buffer);
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(binary);
  }
  async function instance() {
    if (grid) return nest(cells.map(valueOf), shape);
    const audio = document.getElementById("audio");
    if (audio) {
      const file = audio.files[0];
      if (!file) throw new Error("choose a WAV file first");
      const most = Number(audio.dataset.maxBytes);
      if (file.size > most) {
        throw new Error("the file is " + file.size + " bytes, over this model's limit of " + most + ": cut the clip");
      }
      return { b64: base64(await file.arrayBuffer()) };
    }
    const text = document.getElementById("text");
    if (text) {
      if (text.value.trim() === "") throw new Error("write some text first");
      // maxlength counts UTF-16 units, the server UTF-8 bytes: 60,000 Greek letters fit the
      // box and were refused (413) by a 100,000-byte limit.
      const bytes = new TextEncoder().encode(text.value).length;
      const most = Number(text.dataset.maxBytes);
      if (bytes > most) {
        throw new Error("the text is " + bytes + " bytes of UTF-8, over this model's limit of " + most + ": shorten it");
      }
      return text.value;
    }
    // Text fields read strictly: a number field in an English browser took "4,5" for 45
    // (a thousands separator) and sent it without a word (review PG2).
    const raw = fields.map((i) => i.value.trim());
    const values = raw.map((v) => (DECIMAL.test(v) ? Number(v) : NaN));
    const bad = values.findIndex((v) => !Number.isFinite(v));
    if (bad >= 0) {
      const v = raw[bad];
      // "1,000" may be a thousand or one (a decimal comma): ask, never guess (review R20).
      // A group of thousands starts 1-9: "0,500" can only be a decimal comma.
      const thousands = /^[-+]?[1-9]\d{0,2}(,\d{3})+(\.\d+)?$/.test(v);
      const either = /^[-+]?[1-9]\d{0,2},\d{3}$/.test(v);  // one comma, no point: which is it?
      const comma = /^[-+]?\d*,\d+$/.test(v);
      const why = either
        ? "write the number without a comma: " + v.replace(",", "") + " (or, if the comma is a decimal point, " + v.replace(",", ".") + ")"
        : thousands
          ? "write the number without commas: " + v.replace(/,/g, "")
          : comma
            ? "write a decimal point: " + v.replace(",", ".") + ", not " + v
            : "this field needs a number";
      throw Object.assign(new Error(why), { index: bad });
    }
    return nest(values, shape);
  }
  // What a number field held that is not a number ("42-", "1e"): the browser gives "" for
  // it, and the option was left out without a word, its default used (review PG2).
  const UNREAD = {
    samples: "samples must be a whole number of passes",
    seed: "the seed is a whole number, 0 or more",
    confidence: "confidence level must be a number between 0 and 1",
  };
  function parameters() {
    for (const id of Object.keys(UNREAD)) {
      if (document.getElementById(id).validity.badInput) throw new Error(UNREAD[id]);
    }
    const p = {};
    const samples = document.getElementById("samples").value.trim();
    const seed = document.getElementById("seed").value.trim();
    const confidence = document.getElementById("confidence").value.trim();
    if (samples) p.samples = Number(samples);
    if (seed) {
      if (!/^[0-9]+$/.test(seed)) throw new Error("the seed is a whole number, 0 or more");
      // Number() rounds past 2^53 (9007199254740993 became ...992): a larger seed stays its
      // digits here and goes into the body unquoted (json(), below).
      // Leading zeros off: the digits go into the JSON as a number, which may not have them.
      const digits = seed.replace(/^0+(?=[0-9])/, "");
      p.seed = Number.isSafeInteger(Number(digits)) ? Number(digits) : digits;
    }
    if (confidence) p.confidence = Number(confidence);
    return p;
  }

  // The body as JSON, a seed kept as digits written as the number it is. Only the parameters
  // object has a "seed" key, and inside a JSON string every quote is escaped, so the pattern
  // matches nothing else.
  function json(body) {
    const text = JSON.stringify(body);
    const seed = body.parameters.seed;
    return typeof seed === "string" ? text.replace('"seed":"' + seed + '"', '"seed":' + seed) : text;
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearErrors();
    let body;
    try {
      body = { instances: [await instance()], parameters: parameters() };
    } catch (err) {
      showError(err.message, err.index);
      return;
    }
    const headers = { "Content-Type": "application/json", Accept: "application/json" };
    const key = document.getElementById("api-key").value.trim();
    if (key) headers.Authorization = "Bearer " + key;
    result.replaceChildren(el("p", "Predicting…", { class: "busy" }));
    let response, answer;
    try {
      response = await fetch(form.dataset.predictUrl, { method: "POST", headers, body: json(body) });
      // Seeds go up to 2^63 - 1 and most the server draws are past 2^53, which a JS number
      // rounds: the page showed a seed that replayed another answer. The reviver's source text
      // (Chromium 114+, Firefox 135+) keeps their digits; elsewhere they round as before.
      answer = JSON.parse(await response.text(), (k, v, ctx) =>
        k === "seed" && typeof v === "number" && !Number.isSafeInteger(v) && ctx && ctx.source ? ctx.source : v);
    } catch (err) {
      result.replaceChildren();
      formError.textContent = "The server could not be reached or did not answer in JSON: " + err.message;
      return;
    }
    result.replaceChildren();
    if (!response.ok) {
      showError(answer && answer.error ? answer.error : "the server answered " + response.status);
      return;
    }
    draw(answer);
  });

  // --- the answer --------------------------------------------------------------------------
  function facts(rows) {
    const dl = el("dl", null, { class: "facts" });
    for (const [name, value, out] of rows) {
      dl.append(el("dt", name));
      const dd = el("dd", value instanceof Node ? null : value, out ? { "data-out": out } : {});
      if (value instanceof Node) dd.append(value);
      dl.append(dd);
    }
    return dl;
  }
  // Labels joined in one line, each in its own <bdi>: a right-to-left mark in one (U+202E) no
  // longer reverses the others and the commas.
  function isolated(labels) {
    const span = el("span");
    labels.forEach((label, i) => {
      if (i) span.append(", ");
      span.append(el("bdi", label));
    });
    return span;
  }
  // [key, value] of an answer's object, its keys in the order of `names` (the manifest's:
  // whole names, or their first keyChars characters), then any other in the answer's order.
  function inOrder(names, obj) {
    const rank = new Map();
    names.forEach((n, i) => rank.has(n) || rank.set(n, i));
    const cut = (k) => Array.from(k).slice(0, keyChars).join(""); // characters, as the server cut
    const place = (k) => (rank.has(k) ? rank.get(k) : k.length > keyChars && rank.has(cut(k)) ? rank.get(cut(k)) : names.length);
    return Object.entries(obj || {})
      .map((kv, i) => [place(kv[0]), i, kv])
      .sort((a, b) => a[0] - b[0] || a[1] - b[1])
      .map((x) => x[2]);
  }
  function interval(iv) {
    return "[" + fmt(iv.lower) + ", " + fmt(iv.upper) + "] at " + percent(iv.level) + " % (" + iv.method + ")";
  }
  function referral(r) {
    const box = el("div", null, { class: r.refer ? "refer yes" : "refer no", "data-out": "referral" });
    box.append(el("h4", r.refer ? "Refer to a person" : "No referral"));
    if (r.refer) {
      const ul = el("ul");
      for (const reason of r.reasons) {
        // "feature '<name>' = 95 outside the training range ...": the name in its own <bdi>,
        // as in a field's error (a right-to-left mark in it reversed the sentence).
        const at = reason.startsWith("feature '") ? named(reason, 9) : null;
        const li = el("li", at ? null : reason);
        if (at) li.append(reason.slice(0, at[1]), el("bdi", reason.slice(at[1], at[2])), reason.slice(at[2]));
        ul.append(li);
      }
      box.append(ul);
    } else {
      box.append(el("p", "None of the model's referral rules fired."));
    }
    return box;
  }
  // The first interval as a band and the prediction as a line on one axis (a picture of the
  // numbers above, hidden from screen readers, which read those). An unbounded side runs to
  // the edge. Positions are set through CSSOM, which the CSP allows (style attributes it does not).
  function intervalBar(p) {
    const iv = (p.intervals || [])[0];
    if (!iv) return null;
    const spread = 4 * (p.std || Math.abs(p.mean) || 1);
    const lo = iv.lower === null ? p.mean - spread : iv.lower;
    const hi = iv.upper === null ? p.mean + spread : iv.upper;
    const pad = 0.1 * (hi - lo || 1);
    const a = Math.min(lo, p.mean) - pad, b = Math.max(hi, p.mean) + pad;
    const pct = (x) => (100 * (x - a)) / (b - a) + "%";
    const box = el("figure", null, { class: "ivbar" });
    const axis = el("div", null, { class: "axis", "aria-hidden": "true" });
    const band = el("span", null, { class: "band" });
    band.style.left = pct(lo);
    band.style.width = (100 * (hi - lo)) / (b - a) + "%";
    if (iv.lower === null) band.classList.add("open-left");
    if (iv.upper === null) band.classList.add("open-right");
    const mark = el("span", null, { class: "mark" });
    mark.style.left = pct(p.mean);
    axis.append(band, mark);
    box.append(axis);
    box.append(el("figcaption", "Band: the " + percent(iv.level) + " % interval, " + fmt(iv.lower) + " to " + fmt(iv.upper) + "; line: the prediction, " + fmt(p.mean) + "."));
    return box;
  }

  function regression(out, p, u) {
    const rows = [["Prediction", fmt(p.mean) + (u ? " " + u : ""), "mean"]];
    for (const iv of p.intervals || []) rows.push(["Interval", interval(iv), "interval"]);
    if (p.std !== null && p.std !== undefined) rows.push(["Predictive std", fmt(p.std), "std"]);
    if (p.epistemic_std !== null && p.epistemic_std !== undefined) rows.push(["Epistemic std (the model's doubt)", fmt(p.epistemic_std), "epistemic"]);
    if (p.aleatoric_std !== null && p.aleatoric_std !== undefined) rows.push(["Aleatoric std (noise in the data)", fmt(p.aleatoric_std), "aleatoric"]);
    out.append(facts(rows));
    const bar = intervalBar(p);
    if (bar) out.append(bar);
  }

  function draw(answer) {
    const p = answer.predictions[0];
    const out = el("section", null, { "aria-labelledby": "answer-h" });
    out.append(el("h3", "Answer", { id: "answer-h" }));
    const rows = [];
    if (task === "regression" && p.targets) {
      // A multi-output regressor: each target's summary under its name (it drew "unbounded"),
      // in the manifest's order; the name and unit each in a <bdi>.
      for (const [name, t] of inOrder(targetNames, p.targets)) {
        const u = unitOf.get(name) || "";
        const head = el("h4", null, { "data-target": name });
        head.append(el("bdi", name));
        if (u) head.append(" (", el("bdi", u), ")");
        out.append(head);
        regression(out, t, u);
      }
    } else if (task === "regression") {
      regression(out, p, unit);
    } else {
      rows.push(["Predicted class", p.label, "label"]);
      if (p.prediction_set) {
        const labels = p.prediction_set.labels;
        rows.push(["Prediction set at " + percent(p.prediction_set.level) + " %", labels.length ? isolated(labels) : "empty: no class is likely enough", "set"]);
      }
      if (p.uncertainty) {
        rows.push(["Epistemic (mutual information, nats)", fmt(p.uncertainty.mutual_information), "epistemic"]);
        rows.push(["Aleatoric (expected entropy, nats)", fmt(p.uncertainty.expected_entropy), "aleatoric"]);
      }
      out.append(facts(rows));
      const table = el("table", null, { class: "probs" });
      table.append(el("caption", "Class probabilities with their intervals"));
      const head = el("tr");
      for (const h of ["class", "probability", "interval"]) head.append(el("th", h, { scope: "col" }));
      const thead = el("thead");
      thead.append(head);
      table.append(thead);
      const tbody = el("tbody");
      const intervals = new Map(Object.entries(p.intervals || {}));
      for (const [label, prob] of inOrder(labels, p.probabilities)) {
        const tr = el("tr", null, { "data-class": label });
        tr.append(el("th", label, { scope: "row" }));
        // The number and its bar in one cell (a column of bars had a header with no text).
        const cell = el("td");
        cell.append(el("span", fmt(prob), { "data-out": "probability" }), " ");
        cell.append(el("meter", null, { min: "0", max: "1", value: String(prob), "aria-label": "probability of " + label }));
        tr.append(cell);
        const ivs = intervals.get(label) || [];
        tr.append(el("td", ivs.map(interval).join("; ") || "–", { "data-out": "interval" }));
        tbody.append(tr);
      }
      table.append(tbody);
      // A box that scrolls sideways on a narrow screen: reachable from the keyboard, named.
      const wrap = el("div", null, { class: "scroll", tabindex: "0", role: "region", "aria-label": "Class probabilities table" });
      wrap.append(table);
      out.append(wrap);
    }
    if (p.referral) out.append(referral(p.referral));
    if (p.tokens !== undefined && p.tokens !== null) {
      out.append(el("p", p.tokens + " tokens" + (p.truncated ? ", cut to the model's maximum" : ""), { class: "meta", "data-out": "tokens" }));
    }
    if (p.seconds !== undefined && p.seconds !== null) {
      const input = document.getElementById("audio");
      const rate = input ? Number(input.dataset.rate) : p.sample_rate;
      const resampled = p.sample_rate && p.sample_rate !== rate ? ", resampled from " + p.sample_rate + " Hz" : "";
      out.append(el("p", String(Number(p.seconds.toPrecision(6))) + " s of audio" + resampled + (p.truncated ? ", cut to the model's length" : ""), { class: "meta", "data-out": "seconds" }));
    }
    for (const w of answer.warnings || []) out.append(el("p", w, { class: "warning" }));
    out.append(el("p", "Model " + answer.model.name + " version " + answer.model.version + ", " + answer.mode + ", " + answer.samples + " passes, seed " + answer.seed + ".", { class: "meta", "data-out": "meta" }));
    result.append(out);
  }
})();
