(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("cepo-data").textContent);
  const step = data.step, rows = data.rows, summary = data.summary;
  const eps = typeof step.eps_w === "number" ? step.eps_w : null;
  const GREEN = [34, 197, 94], RED = [239, 68, 68];

  function num(x) {
    if (typeof x === "number") return x;
    if (x === "Infinity") return Infinity;
    if (x === "-Infinity") return -Infinity;
    if (x === "NaN") return NaN;
    return null;
  }
  function at(arr, i) { return arr == null ? null : num(arr[i]); }
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text != null) node.textContent = text;
    return node;
  }
  function fmtSigned(x, digits) {
    if (x == null || Number.isNaN(x)) return "n/a";
    if (Math.abs(x) >= 1e30) return x > 0 ? "+\u221e" : "\u2212\u221e";
    const text = x.toFixed(digits);
    return x > 0 ? "+" + text : Number(text) === 0 ? Math.abs(x).toFixed(digits) : text;
  }
  function fmtProb(logp) {
    if (logp == null || Number.isNaN(logp)) return "n/a";
    const p = Math.exp(logp);
    if (p === 0) return "0";
    if (p >= 0.001) return p.toFixed(4);
    return p.toExponential(2);
  }
  function fmtW(w) { return w == null || Number.isNaN(w) ? "n/a" : w.toFixed(3); }
  function fmtRate(r) { return r == null ? "n/a" : (100 * r).toFixed(1) + "%"; }
  function fmtNum(x, d) { const v = num(x); return v == null ? "n/a" : v.toFixed(d); }

  // Colour of one weight. mode "credit": by sign(A)·(w − 1); mode "weight": by w − 1. |w − 1|/ε_w → intensity.
  function colour(w, adv, mode) {
    if (w == null || !Number.isFinite(w) || eps == null) return null;
    let d = w - 1;
    if (mode === "credit" && adv < 0) d = -d;
    const t = Math.min(1, Math.abs(d) / eps);
    const target = d > 0 ? GREEN : RED;
    const mix = target.map(function (c) { return Math.round(255 + (c - 255) * t); });
    return "rgb(" + mix.join(", ") + ")";
  }

  function showText(tok, node) {
    if (tok === "") { node.appendChild(el("span", "mark", "\u2205")); return; }
    if (/^[ \t]+$/.test(tok)) {
      node.appendChild(el("span", "mark", tok.replace(/ /g, "\u2423").replace(/\t/g, "\u21e5")));
      return;
    }
    const parts = tok.split(/(\n|\r|\t)/);
    for (const part of parts) {
      if (part === "\n") node.appendChild(el("span", "mark", "\u21b5\n"));
      else if (part === "\r") node.appendChild(el("span", "mark", "\u240d"));
      else if (part === "\t") node.appendChild(el("span", "mark", "\u21e5"));
      else if (part) node.appendChild(document.createTextNode(part));
    }
  }

  function tipText(row, i) {
    const tok = row.tokens[i];
    const lines = ["token " + i + ": " + JSON.stringify(tok)];
    if (row.scored) {
      lines.push("\u0394 = " + fmtSigned(at(row.delta, i), 3));
      lines.push("P_T\u207a = " + fmtProb(at(row.logp_pos, i)));
      lines.push("P_T\u207b = " + fmtProb(at(row.logp_neg, i)));
    }
    lines.push("P_S = " + fmtProb(at(row.logp_student, i)));
    if (row.scored) {
      lines.push("w_CEPO = " + fmtW(at(row.w_cepo, i)));
      lines.push("w_RLSD = " + fmtW(at(row.w_rlsd, i)));
    }
    return lines.join("\n");
  }

  const tip = el("div");
  tip.id = "tip";
  document.body.appendChild(tip);
  document.addEventListener("mouseover", function (ev) {
    const span = ev.target.closest ? ev.target.closest(".tok") : null;
    if (!span) { tip.style.display = "none"; return; }
    tip.textContent = span.getAttribute("title");
    tip.style.display = "block";
  });
  document.addEventListener("mousemove", function (ev) {
    if (tip.style.display !== "block") return;
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
    const y = ev.clientY + 18 + tip.offsetHeight > window.innerHeight ? ev.clientY - tip.offsetHeight - 10
      : ev.clientY + 18;
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  });

  // ---- header
  const root = document.getElementById("app");
  root.appendChild(el("h1", null, data.title));
  const meta = el("div", "meta");
  function metaItem(parent, label, value, id) {
    const item = el("span");
    if (id) item.id = id;
    item.appendChild(document.createTextNode(label + " "));
    item.appendChild(el("b", null, value));
    parent.appendChild(item);
  }
  metaItem(meta, "run", data.run == null ? "n/a" : String(data.run));
  // the k-th training step (the record's own "step" field counts from 0)
  metaItem(meta, "step", data.step_number == null ? "n/a" : String(data.step_number));
  metaItem(meta, "method", step.method == null ? "n/a" : String(step.method));
  metaItem(meta, "\u03bb", fmtNum(step.lam, 3));
  metaItem(meta, "\u03b5_w", fmtNum(step.eps_w, 3));
  if (step.policy_version != null) metaItem(meta, "policy version", String(step.policy_version));
  root.appendChild(meta);
  const counts = el("div", "meta");
  counts.id = "counts";
  metaItem(counts, "rollouts", String(summary.rollouts));
  metaItem(counts, "groups", String(summary.groups));
  metaItem(counts, "correct", String(summary.correct));
  metaItem(counts, "wrong", String(summary.wrong));
  metaItem(counts, "scored rows", String(summary.scored_rows));
  metaItem(counts, "unscored rows", String(summary.unscored_rows));
  metaItem(counts, "scored tokens", String(summary.scored_tokens));
  root.appendChild(counts);
  const clip = el("div", "meta");
  clip.id = "clip-rate";
  metaItem(clip, "clip rate (w at 1 \u00b1 \u03b5_w, scored tokens): CEPO", fmtRate(summary.clip_rate_cepo),
    "clip-cepo");
  metaItem(clip, "RLSD", fmtRate(summary.clip_rate_rlsd), "clip-rlsd");
  root.appendChild(clip);

  // ---- controls
  const controls = el("div", "controls");
  function select(id, label, options) {
    const wrap = el("label", null, label + " ");
    const sel = el("select");
    sel.id = id;
    for (const [value, text] of options) {
      const opt = el("option", null, text);
      opt.value = value;
      sel.appendChild(opt);
    }
    wrap.appendChild(sel);
    controls.appendChild(wrap);
    return sel;
  }
  const filterSel = select("filter", "show", [["all", "all"], ["correct", "only correct"], ["wrong", "only wrong"]]);
  // default: the rollout with the largest |Δ| first, so the page opens on the strongest token evidence
  const sortSel = select("sort", "order", [["absdelta", "largest |\u0394| first"], ["index", "as sampled"],
    ["absadv", "by |A|, largest first"]]);
  const modeSel = select("colour", "colour", [["credit", "credit: sign(A)\u00b7(w\u22121)"],
    ["weight", "weight: w\u22121"]]);
  const legend = el("span", "legend");
  function swatch(rgb, text) {
    const s = el("span", "swatch");
    s.style.backgroundColor = "rgb(" + rgb.join(", ") + ")";
    legend.appendChild(s);
    legend.appendChild(document.createTextNode(text));
  }
  swatch(RED, "pushed down more");
  swatch([255, 255, 255], "w = 1");
  swatch(GREEN, "pushed up more (full colour at the clip 1 \u00b1 \u03b5_w)");
  controls.appendChild(legend);
  root.appendChild(controls);

  // ---- cards
  const list = el("div");
  list.id = "rollouts";
  root.appendChild(list);
  const cards = [];
  const colourable = [];

  function field(parent, key, value, cls) {
    const div = el("div", "field");
    div.appendChild(el("span", "k", key));
    div.appendChild(el("span", cls || null, value));
    parent.appendChild(div);
  }

  function tokenLine(card, label, row, wKey) {
    const line = el("div", "line");
    line.appendChild(el("div", "line-label", label));
    const toks = el("div", "toks");
    toks.dataset.line = wKey || "plain";
    const adv = num(row.advantage) || 0;
    row.tokens.forEach(function (tok, i) {
      const span = el("span", "tok");
      showText(tok, span);
      span.dataset.i = String(i);
      span.title = tipText(row, i);
      if (row.scored) {
        span.dataset.wCepo = String(at(row.w_cepo, i));
        span.dataset.wRlsd = String(at(row.w_rlsd, i));
        span.dataset.delta = String(at(row.delta, i));
      }
      if (wKey) colourable.push([span, at(row[wKey], i), adv]);
      toks.appendChild(span);
    });
    line.appendChild(toks);
    card.appendChild(line);
  }

  // The largest |Δ_t| of a row (an infinite one counts, NaN does not); -1 when the row has no Δ.
  function maxAbsDelta(row) {
    let best = -1;
    if (!row.scored || row.delta == null) return best;
    for (let i = 0; i < row.delta.length; i++) {
      const d = at(row.delta, i);
      if (d != null && !Number.isNaN(d) && Math.abs(d) > best) best = Math.abs(d);
    }
    return best;
  }

  rows.forEach(function (row, index) {
    const card = el("div", "card");
    card.dataset.index = String(index);
    const peak = maxAbsDelta(row);
    card.dataset.maxAbsDelta = String(peak);
    card.dataset.correct = row.correct === true ? "true" : row.correct === false ? "false" : "unknown";
    const adv = num(row.advantage);
    card.dataset.absAdv = String(adv == null ? 0 : Math.abs(adv));
    const head = el("div", "card-head");
    head.appendChild(el("b", null, "rollout " + index + (row.group != null ? " \u00b7 group " + row.group : "")));
    head.appendChild(el("span", "badge " + (row.correct === true ? "ok" : row.correct === false ? "bad" : "none"),
      row.correct === true ? "correct" : row.correct === false ? "wrong" : "unverified"));
    head.appendChild(el("span", null, "reward " + fmtNum(row.reward, 3)));
    head.appendChild(el("span", null, "A = " + fmtSigned(adv, 3)));
    if (peak >= 0) head.appendChild(el("span", null, "max |\u0394| = " + fmtSigned(peak, 3).replace(/^\+/, "")));
    if (!row.scored) head.appendChild(el("span", "badge none", "not scored"));
    card.appendChild(head);
    card.appendChild(el("div", "prompt", row.prompt == null ? "" : row.prompt));
    field(card, "r\u207a (answer)", row.answer == null ? "n/a" : row.answer);
    field(card, "r\u207b (negative)", row.negative == null
      ? "none: no wrong rollout in the group (P_T\u207b := P_S, CEPO = RLSD)" : row.negative);
    if (row.scored && row.w_cepo != null && row.w_rlsd != null) {
      tokenLine(card, "CEPO", row, "w_cepo");
      tokenLine(card, "RLSD", row, "w_rlsd");
    } else {
      tokenLine(card, "tokens", row, null);
      card.appendChild(el("div", "note", row.scored
        ? "no evidence weights recorded for this row: tokens are uncoloured"
        : "not scored by the teacher (A = 0, GRPO or \u03bb = 0): every token keeps the sequence advantage A; " +
          "tokens are uncoloured"));
    }
    list.appendChild(card);
    cards.push(card);
  });
  if (!rows.length) list.appendChild(el("div", "note", "this step recorded no rollouts"));

  function recolour() {
    const mode = modeSel.value;
    for (const [span, w, adv] of colourable) {
      const c = colour(w, adv, mode);
      if (c) span.style.backgroundColor = c;
      else span.style.removeProperty("background-color");
    }
  }
  function refilter() {
    const f = filterSel.value;
    for (const card of cards) {
      const hide = (f === "correct" && card.dataset.correct !== "true") ||
        (f === "wrong" && card.dataset.correct !== "false");
      card.classList.toggle("hidden", hide);
    }
  }
  function resort() {
    const ordered = cards.slice();
    const key = sortSel.value === "absadv" ? "absAdv" : sortSel.value === "absdelta" ? "maxAbsDelta" : null;
    if (key) {
      ordered.sort(function (a, b) {
        const x = Number(a.dataset[key]), y = Number(b.dataset[key]);
        return (x === y ? 0 : y > x ? 1 : -1) || Number(a.dataset.index) - Number(b.dataset.index);
      });
    }
    for (const card of ordered) list.appendChild(card);
  }
  filterSel.addEventListener("change", refilter);
  sortSel.addEventListener("change", resort);
  modeSel.addEventListener("change", recolour);
  resort();
  recolour();
  document.body.dataset.ready = "1";
})();
