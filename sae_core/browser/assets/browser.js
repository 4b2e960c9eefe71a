// sae_core feature browser: static pages over data chunks loaded as <script> files (works from file://).
"use strict";
const SAEB = (function () {
  const data = {};
  const pending = {};
  const PAGE = 100;

  function register(name, payload) {
    data[name] = payload;
    if (pending[name]) { pending[name].resolve(payload); }
  }

  function load(name, src) {
    if (data[name] !== undefined) { return Promise.resolve(data[name]); }
    if (!pending[name]) {
      let resolve, reject;
      const promise = new Promise(function (res, rej) { resolve = res; reject = rej; });
      pending[name] = { promise: promise, resolve: resolve, reject: reject };
      const script = document.createElement("script");
      script.src = src;
      script.onerror = function () { reject(new Error("could not load " + src)); };
      document.head.appendChild(script);
    }
    return pending[name].promise;
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") { node.textContent = value; } else { node.setAttribute(key, value); }
    }
    for (const child of children || []) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function tokenText(id) {
    const vocab = data.vocab || [];
    const s = id < vocab.length ? vocab[id] : "<" + id + ">";
    return s.replace(/\n/g, "\u21b5");
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) { return ""; }
    if (x !== 0 && Math.abs(x) < 1e-3) { return x.toExponential(2); }
    return Number(x).toFixed(digits === undefined ? 3 : digits);
  }

  function latentLink(id, label) {
    return el("a", { href: "latent.html#" + id, "class": "latent-link", "data-latent": String(id) },
      [label === undefined ? "#" + id : label]);
  }

  // ---- index page ------------------------------------------------------------------------------
  const state = { sortKey: "id", descending: false, page: 0, rows: [], match: null };

  function matchQuery(index, query) {
    const q = query.trim();
    const idMatch = /^#?(\d+)$/.exec(q);
    const matches = new Map();
    if (idMatch) {
      const id = Number(idMatch[1]);
      if (id < index.count.length) { matches.set(id, Infinity); }
      return matches;
    }
    const exact = query;
    const loose = q.toLowerCase();
    for (let i = 0; i < index.top_tokens.length; i++) {
      for (const [token, value] of index.top_tokens[i]) {
        const s = (data.vocab[token] || "");
        if (s === exact || (loose && s.trim().toLowerCase() === loose)) {
          matches.set(i, Math.max(matches.get(i) || 0, value));
        }
      }
    }
    return matches;
  }

  function refreshIndex() {
    const index = data.index;
    const query = document.getElementById("search").value;
    const alive = document.getElementById("alive").value;
    const band = document.getElementById("band").value;
    state.match = query.trim() ? matchQuery(index, query) : null;
    let rows = [];
    for (let i = 0; i < index.count.length; i++) {
      if (alive === "alive" && index.count[i] === 0) { continue; }
      if (alive === "dead" && index.count[i] > 0) { continue; }
      if (band !== "all") {
        const [lo, hi] = band.split(",").map(Number);
        const d = Math.log10(index.density[i] || 1e-12);
        if (d < lo || d >= hi) { continue; }
      }
      if (state.match && !state.match.has(i)) { continue; }
      rows.push(i);
    }
    const key = state.match && state.sortKey === "id" ? "match" : state.sortKey;
    const value = function (i) {
      if (key === "id") { return i; }
      if (key === "match") { return state.match ? (state.match.get(i) || 0) : 0; }
      return index[key][i];
    };
    const sign = (key === "match" && state.sortKey === "id") ? -1 : (state.descending ? -1 : 1);
    rows.sort(function (a, b) { return sign * (value(a) - value(b)) || a - b; });
    state.rows = rows;
    state.page = Math.min(state.page, Math.max(0, Math.ceil(rows.length / PAGE) - 1));
    renderRows();
  }

  function renderRows() {
    const index = data.index;
    const body = document.querySelector("#latents tbody");
    body.textContent = "";
    const first = state.page * PAGE;
    for (const i of state.rows.slice(first, first + PAGE)) {
      const tokens = index.top_tokens[i].map(function (p) { return JSON.stringify(tokenText(p[0])); }).join(" ");
      const match = state.match && state.match.has(i) ? fmt(state.match.get(i)) : "";
      body.appendChild(el("tr", { "class": index.count[i] ? "" : "dead", "data-latent": String(i) }, [
        el("td", {}, [latentLink(i)]), el("td", { text: fmt(index.density[i], 5) }),
        el("td", { text: fmt(index.max[i]) }), el("td", { text: fmt(index.mean[i]) }),
        el("td", { "class": "match", text: match }), el("td", { text: tokens }),
        el("td", { text: index.summary[i] }),
      ]));
    }
    const pages = Math.max(1, Math.ceil(state.rows.length / PAGE));
    document.getElementById("count").textContent = state.rows.length + " latents";
    document.getElementById("page").textContent = " page " + (state.page + 1) + " / " + pages + " ";
  }

  function drawHeatmap() {
    const heat = data.index.heatmap;
    const canvas = document.getElementById("heatmap");
    const n = heat.ids.length;
    if (!n) { document.getElementById("heatmap-info").textContent = "No live latents to show."; return; }
    const ctx = canvas.getContext("2d");
    const cell = canvas.width / n;
    for (let r = 0; r < n; r++) {
      for (let c = 0; c < n; c++) {
        const v = Math.max(-1, Math.min(1, heat.values[r][c]));
        const red = v > 0 ? 255 : Math.round(255 * (1 + v));
        const blue = v < 0 ? 255 : Math.round(255 * (1 - v));
        const green = Math.round(255 * (1 - Math.abs(v)));
        ctx.fillStyle = "rgb(" + red + "," + green + "," + blue + ")";
        ctx.fillRect(c * cell, r * cell, Math.ceil(cell), Math.ceil(cell));
      }
    }
    const at = function (event) {
      const box = canvas.getBoundingClientRect();
      const c = Math.floor((event.clientX - box.left) / box.width * n);
      const r = Math.floor((event.clientY - box.top) / box.height * n);
      return (r >= 0 && r < n && c >= 0 && c < n) ? [r, c] : null;
    };
    canvas.addEventListener("mousemove", function (event) {
      const rc = at(event);
      if (rc) {
        const [r, c] = rc;
        canvas.title = "#" + heat.ids[r] + " x #" + heat.ids[c] + ": " + heat.metric + " " + fmt(heat.values[r][c]);
      }
    });
    canvas.addEventListener("click", function (event) {
      const rc = at(event);
      if (rc) { window.location.href = "latent.html#" + heat.ids[rc[0]]; }
    });
  }

  function initIndex() {
    const meta = data.meta;
    document.title = meta.title;
    document.getElementById("title").textContent = meta.title;
    document.getElementById("subtitle").textContent = meta.n_features + " latents over " + meta.n_rows +
      " tokens" + (meta.model ? " of " + meta.model : "") + (meta.whitened ? " (whitened SAE)" : "");
    for (const id of ["search", "alive", "band"]) {
      document.getElementById(id).addEventListener("input", function () { state.page = 0; refreshIndex(); });
    }
    for (const th of document.querySelectorAll("th[data-key]")) {
      th.addEventListener("click", function () {
        const key = th.getAttribute("data-key");
        state.descending = state.sortKey === key ? !state.descending : key !== "id";
        state.sortKey = key;
        refreshIndex();
      });
    }
    document.getElementById("prev").addEventListener("click", function () {
      state.page = Math.max(0, state.page - 1); renderRows();
    });
    document.getElementById("next").addEventListener("click", function () {
      state.page = Math.min(Math.ceil(state.rows.length / PAGE) - 1, state.page + 1); renderRows();
    });
    refreshIndex();
    drawHeatmap();
  }

  // ---- latent page -----------------------------------------------------------------------------
  function exampleNode(ex, max) {
    const children = [el("span", { "class": "val", text: fmt(ex.value) })];
    ex.tokens.forEach(function (token, i) {
      const act = ex.acts[i];
      const alpha = max > 0 ? Math.max(0, act) / max : 0;
      children.push(el("span", {
        "class": "tok" + (i === ex.focus ? " focus" : ""), "data-act": String(act),
        title: JSON.stringify(tokenText(token)) + " " + fmt(act),
        style: "background: rgba(255, 110, 0, " + alpha.toFixed(3) + ")",
      }, [tokenText(token)]));
    });
    return el("div", { "class": "example" }, children);
  }

  function barChart(counts, lo, hi, label) {
    const w = 360, h = 120, n = counts.length, top = Math.max(1, Math.max.apply(null, counts));
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h + 16);
    counts.forEach(function (c, i) {
      const bar = document.createElementNS(svg.namespaceURI, "rect");
      const bh = h * c / top;
      bar.setAttribute("x", i * w / n); bar.setAttribute("y", h - bh);
      bar.setAttribute("width", Math.max(1, w / n - 1)); bar.setAttribute("height", bh);
      bar.setAttribute("fill", "#e07020");
      const tip = document.createElementNS(svg.namespaceURI, "title");
      const width = (hi - lo) / n;
      tip.textContent = fmt(lo + i * width) + " .. " + fmt(lo + (i + 1) * width) + ": " + c;
      bar.appendChild(tip);
      svg.appendChild(bar);
    });
    const text = document.createElementNS(svg.namespaceURI, "text");
    text.setAttribute("x", 0); text.setAttribute("y", h + 12);
    text.textContent = label + ": " + fmt(lo) + " .. " + fmt(hi);
    svg.appendChild(text);
    return svg;
  }

  function pairTable(id, title, pairs, isLatent, digits) {
    const rows = pairs.map(function (p) {
      return el("tr", {}, [el("td", {}, [isLatent ? latentLink(p[0]) : JSON.stringify(tokenText(p[0]))]),
        el("td", { text: fmt(p[1], digits) })]);
    });
    return el("div", { id: id }, [el("h3", { text: title }),
      rows.length ? el("table", {}, rows) : el("p", { text: "none" })]);
  }

  function steeringNode(records) {
    const head = el("tr", {}, ["coefficient", "concept score", "perplexity", "distinct tokens"].map(function (t) {
      return el("th", { text: t });
    }));
    const rows = records.map(function (r) {
      return el("tr", {}, [r.coefficient, r.concept_score, r.perplexity, r.distinct_fraction].map(function (v) {
        return el("td", { text: fmt(v) });
      }));
    });
    const chart = el("div", {}, []);
    const w = 360, h = 120;
    const xs = records.map(function (r) { return r.coefficient; });
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h);
    [["concept_score", "#2060c0"], ["perplexity", "#c03020"]].forEach(function (series) {
      const ys = records.map(function (r) { return r[series[0]]; });
      const x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
      const y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
      const points = records.map(function (r) {
        const x = x1 > x0 ? (r.coefficient - x0) / (x1 - x0) * (w - 10) + 5 : w / 2;
        const y = y1 > y0 ? h - 5 - (r[series[0]] - y0) / (y1 - y0) * (h - 10) : h / 2;
        return x.toFixed(1) + "," + y.toFixed(1);
      });
      const line = document.createElementNS(svg.namespaceURI, "polyline");
      line.setAttribute("points", points.join(" ")); line.setAttribute("fill", "none");
      line.setAttribute("stroke", series[1]);
      svg.appendChild(line);
    });
    chart.appendChild(svg);
    return el("section", { id: "steering" }, [el("h2", { text: "Steering dose-response" }),
      el("p", { text: "blue: concept score, red: perplexity (each scaled to its range)" }), chart,
      el("table", {}, [head].concat(rows))]);
  }

  function renderLatent(r) {
    const main = document.getElementById("latent");
    main.textContent = "";
    document.title = "Latent " + r.id;
    main.appendChild(el("h1", { id: "latent-title", "data-latent": String(r.id), text: "Latent #" + r.id }));
    main.appendChild(el("p", { id: "summary", text: r.summary }));
    main.appendChild(el("p", { id: "stats", text: "density " + fmt(r.density, 6) + " (" + r.count +
      " tokens) | max activation " + fmt(r.max) + " | mean when active " + fmt(r.mean) }));
    if (r.count) { main.appendChild(el("div", { id: "histogram" }, [barChart(r.hist.counts, r.hist.lo, r.hist.hi, "activation")])); }
    const cols = el("div", { "class": "cols" }, [
      pairTable("logits-pos", "Promoted tokens (logit lens)", r.logits.pos, false),
      pairTable("logits-neg", "Suppressed tokens", r.logits.neg, false),
      pairTable("neighbours", "Nearest latents (decoder cosine)", r.neighbours, true),
      pairTable("jaccard", "Co-occurring (Jaccard)", r.jaccard, true),
      pairTable("pmi", "Co-occurring (PMI)", r.pmi, true, 2),
    ]);
    main.appendChild(cols);
    if (r.steering) { main.appendChild(steeringNode(r.steering)); }
    const top = el("section", { id: "top-examples" }, [el("h2", { text: "Top activations" })]);
    for (const ex of r.top) { top.appendChild(exampleNode(ex, r.max)); }
    main.appendChild(top);
    const quantiles = el("section", { id: "quantile-examples" }, [el("h2", { text: "Examples by activation quantile" })]);
    for (const group of r.quantiles) {
      quantiles.appendChild(el("h3", { text: fmt(group.lo) + " .. " + fmt(group.hi) + " (" +
        (100 * group.share).toFixed(1) + "% of firings)" }));
      for (const ex of group.examples) { quantiles.appendChild(exampleNode(ex, r.max)); }
    }
    main.appendChild(quantiles);
  }

  function showLatent() {
    const meta = data.meta;
    const id = Number((window.location.hash || "#0").slice(1));
    const main = document.getElementById("latent");
    if (!Number.isInteger(id) || id < 0 || id >= meta.n_features) {
      main.textContent = "No latent " + window.location.hash + " (ids are 0.." + (meta.n_features - 1) + ")";
      return;
    }
    const chunk = Math.floor(id / meta.chunk_latents);
    const name = "chunk:" + chunk;
    const src = "data/chunk_" + String(chunk).padStart(4, "0") + ".js";
    load(name, src).then(function (records) {
      renderLatent(records[id - chunk * meta.chunk_latents]);
    }, function (error) { main.textContent = error.message; });
  }

  function initLatent() {
    window.addEventListener("hashchange", showLatent);
    document.getElementById("goto").addEventListener("submit", function (event) {
      event.preventDefault();
      window.location.hash = "#" + document.getElementById("goto-id").value;
    });
    showLatent();
  }

  return { register: register, load: load, data: data, initIndex: initIndex, initLatent: initLatent };
})();
