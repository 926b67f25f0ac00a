// The explorer's pages: each fetches the JSON API and writes every value with
// textContent (never innerHTML), so labels from Neuronpedia or model text stay text.
(function () {
  "use strict";
  const body = document.body;
  const config = JSON.parse(body.dataset.config || "{}");
  const $ = (id) => document.getElementById(id);

  async function api(path, options) {
    let response;
    try {
      response = await fetch(path, Object.assign({headers: {Accept: "application/json"}}, options || {}));
    } catch (err) {
      throw new Error("the explorer server does not answer (is flowdb serve still running?)");
    }
    let payload = null;
    try { payload = await response.json(); } catch (err) { payload = null; }
    if (!response.ok) throw new Error((payload && payload.error) || ("HTTP " + response.status));
    return payload;
  }

  function showError(err) {
    const box = $("error");
    box.textContent = err ? String(err.message || err) : "";
    box.hidden = !err;
  }

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text != null) node.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }

  function fmt(value) {
    if (value == null) return "";
    if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(3);
    if (Array.isArray(value)) return value.map(fmt).join(", ");
    if (typeof value === "object") return JSON.stringify(value);
    return String(value);
  }

  function featureHref(key) {
    return "/feature/" + key.split("/").map(encodeURIComponent).join("/");
  }

  function graphHref(slug) { return "/graph/" + encodeURIComponent(slug); }

  const KEY_COLUMNS = /(^key$|_key$|^source$|^target$)/;

  // A table from columns and row objects; feature keys become links to their pages.
  function fillTable(table, columns, rows) {
    table.replaceChildren();
    const head = el("tr");
    columns.forEach((c) => head.appendChild(el("th", c)));
    table.appendChild(el("thead")).appendChild(head);
    const tbody = table.appendChild(el("tbody"));
    for (const row of rows) {
      const tr = tbody.appendChild(el("tr"));
      columns.forEach((c, i) => {
        const value = Array.isArray(row) ? row[i] : row[c];
        const td = tr.appendChild(el("td"));
        if (typeof value === "string" && KEY_COLUMNS.test(c) && value.split("/").length === 4) {
          td.appendChild(el("a", value, {href: featureHref(value)}));
        } else if (typeof value === "string" && /url$/.test(c) && /^https:\/\//.test(value)) {
          td.appendChild(el("a", value, {href: value, target: "_blank", rel: "noopener noreferrer"}));
        } else {
          td.textContent = fmt(value && value.node !== undefined ? value.node : value);
        }
      });
    }
    if (!rows.length) tbody.appendChild(el("tr")).appendChild(el("td", "(no rows)", {colspan: columns.length}));
  }

  // One column of a filled table made links (hrefOf(row) gives each address), its text kept as text.
  function linkColumn(table, columns, rows, column, hrefOf) {
    const at = columns.indexOf(column);
    table.querySelectorAll("tbody tr").forEach((tr, i) => {
      if (rows[i]) tr.children[at].replaceChildren(el("a", rows[i][column], {href: hrefOf(rows[i])}));
    });
  }

  // --- find a feature: type-ahead over label words ------------------------------------------
  function setupFind() {
    const box = $("find-box"), list = $("find-suggestions");
    let timer = null, asked = 0;
    box.addEventListener("input", () => {
      clearTimeout(timer);
      const text = box.value.trim();
      if (text.length < 2) { list.hidden = true; return; }
      timer = setTimeout(async () => {
        const mine = ++asked;
        try {
          const answer = await api("/api/search?limit=8&q=" + encodeURIComponent(text));
          if (mine !== asked) return;
          list.replaceChildren();
          for (const r of answer.results) {
            const li = list.appendChild(el("li", null, {role: "option"}));
            li.appendChild(el("a", r.key, {href: featureHref(r.key)}));
            li.appendChild(el("span", " " + (r.matched || r.label || ""), {class: "suggestion-label"}));
          }
          list.hidden = !answer.results.length;
        } catch (err) { list.hidden = true; }
      }, 150);
    });
    box.addEventListener("blur", () => setTimeout(() => { list.hidden = true; }, 200));
  }

  // --- pages -----------------------------------------------------------------------------------
  async function packsPage() {
    const answer = await api("/api/packs");
    const rows = answer.packs.map((p) => ({
      pack: p.name, model: p.model, status: p.status, layers: p.first_layer + "-" + p.last_layer,
      widths: Object.entries(p.widths).map(([m, w]) => m + " " + w.join("/")).join(", "),
      k: p.k, matcher: p.matcher, rule: p.rule, build: (p.fingerprint || "").slice(0, 12)}));
    const columns = ["pack", "model", "status", "layers", "widths", "k", "matcher", "rule", "build"];
    fillTable($("packs-table"), columns, rows);
    linkColumn($("packs-table"), columns, rows, "pack", (row) => "/pack/" + encodeURIComponent(row.pack));
  }

  async function graphsPage() {
    const answer = await api("/api/graphs");
    const rows = answer.graphs.map((g) => Object.assign({graph: g.slug}, g));
    const columns = ["graph", "prompt", "scan", "nodes", "links", "pack", "imported"];
    fillTable($("graphs-table"), columns, rows);
    linkColumn($("graphs-table"), columns, rows, "graph", (row) => graphHref(row.slug));
  }

  function cutText(cut) {
    const n = cut.nodes, l = cut.links;
    const nodes = n.shown < n.of
      ? "Drawn: the " + n.shown + " most influential of " + n.of + " feature and error nodes (at most " + n.cap +
        "; a node's influence is circuit-tracer's cumulative share of the nodes ranked above it, so the smallest come first)"
      : "Drawn: all " + n.of + " feature and error nodes";
    const links = l.shown < l.among
      ? "the " + l.shown + " strongest by |weight| of the " + l.among + " links among the drawn nodes (at most " + l.cap + ")"
      : "all " + l.among + " links among the drawn nodes";
    return nodes + ", every input token and logit (" + n.always + "), and " + links + "; the graph stores " + l.of +
      " links. Larger caps (at most 500 nodes, 5000 links) are slower to draw and harder to read.";
  }

  async function graphPage() {
    const slug = body.dataset.slug;
    const given = new URL(window.location.href).searchParams, query = new URLSearchParams();
    for (const name of ["nodes", "links"]) {
      if (given.get(name)) { query.set(name, given.get(name)); $("graph-controls").elements[name].value = given.get(name); }
    }
    const view = await api("/api/graphs/" + encodeURIComponent(slug) + (query.toString() ? "?" + query : ""));
    const g = view.graph, record = $("graph-record");
    const items = {prompt: g.prompt, tokens: (g.prompt_tokens || []).map((t) => JSON.stringify(t)).join(" "), scan: g.scan,
                   pack: g.pack ? g.pack + " (" + g.module + " features)" : "tied to no pack", nodes: g.nodes, links: g.links,
                   "node threshold": g.node_threshold, file: g.file, imported: g.imported};
    for (const [k, v] of Object.entries(items)) { record.appendChild(el("dt", k)); record.appendChild(el("dd", fmt(v))); }
    const focus = given.get("focus");
    const unseen = focus && !view.nodes.some((n) => n.node_id === focus)
      ? " Node " + focus + " (from the feature page) is not among the drawn nodes: raise the node cap." : "";
    $("graph-cut").textContent = cutText(view.cut) + unseen;
    CircuitView.draw($("circuit-graph"), view, {focus}, (key) => { window.location.href = featureHref(key); });
    body.dataset.graphNodes = String(view.nodes.length);
    fillTable($("supernodes-table"), ["name", "origin", "rules", "members", "drawn"], view.supernodes.map((s) => ({
      name: s.name, origin: s.origin, rules: s.rules, members: s.node_ids, drawn: s.drawn.length + " of " + s.node_ids.length})));
    const tokens = g.prompt_tokens || [];
    fillTable($("graph-nodes-table"), ["node_id", "kind", "layer", "position", "token", "clerp", "influence", "activation", "key"],
              view.nodes.map((n) => Object.assign({}, n, {position: n.ctx_idx, token: tokens[n.ctx_idx]})));
  }

  async function packPage() {
    const name = body.dataset.pack;
    const p = await api("/api/packs/" + encodeURIComponent(name));
    const record = $("pack-record");
    const items = {model: p.model, status: p.status, layers: p.first_layer + "-" + p.last_layer,
                   widths: Object.entries(p.widths).map(([m, w]) => m + " " + w.join("/")).join(", "),
                   "build fingerprint": p.fingerprint, matcher: p.matcher, k: p.k, "threshold rule": p.rule,
                   "chance quantile": p.q_chance};
    for (const [k, v] of Object.entries(items)) { record.appendChild(el("dt", k)); record.appendChild(el("dd", fmt(v))); }
    const cats = [["translated", "translated"], ["processed", "processed"], ["newborn", "newborn"], ["from_nowhere", "from nowhere"]];
    const colours = {translated: "#1f77b4", processed: "#9467bd", newborn: "#2ca02c", from_nowhere: "#7f7f7f"};
    Plotly.newPlot($("origins-chart"), cats.map(([c, label]) => ({
      type: "bar", name: label, x: p.origins.map((o) => o.layer),
      y: p.origins.map((o) => o.total ? o[c] / o.total : 0), customdata: p.origins.map((o) => o[c]),
      hovertemplate: label + ": %{customdata} features (%{y:.1%}) at layer %{x}<extra></extra>",
      marker: {color: colours[c]}})), {barmode: "stack", yaxis: {title: "share of residual features", tickformat: ".0%"},
      xaxis: {title: "layer", dtick: 1}, height: 360, margin: {t: 20}}, {displaylogo: false, responsive: true});
    fillTable($("thresholds-table"),
      ["layer", "rule", "t_res", "chance_res", "above_chance_res", "t_mlp", "chance_mlp", "above_chance_mlp",
       "t_att", "chance_att", "above_chance_att"], p.layers);
    const select = $("histogram-layer");
    const layers = [...new Set(p.histograms.map((h) => h.layer))];
    layers.forEach((l) => select.appendChild(el("option", l, {value: l})));
    const draw = () => histogram(p.histograms.filter((h) => String(h.layer) === select.value));
    select.addEventListener("change", draw);
    if (layers.length) { select.value = String(layers[layers.length - 1]); draw(); }
    fillTable($("labels-table"), ["module", "features", "labelled", "explanations", "sources"], p.labels);
  }

  function histogram(parts) {  // eslint-disable-line no-param-reassign
    const places = {res: "R(L-1)", mlp: "M(L)", att: "A(L)"};
    const traces = [], shapes = [], titles = [], axes = {};
    const order = {res: 0, mlp: 1, att: 2};
    parts = parts.slice().sort((a, b) => order[a.place] - order[b.place]);
    parts.forEach((h, i) => {
      axes["xaxis" + (i ? i + 1 : "")] = {range: [-0.25, 1.0], title: "top-1 cosine with " + places[h.place]};
      titles.push({text: "<b>" + places[h.place] + "</b>", xref: "x" + (i ? i + 1 : "") + " domain", x: 0.5,
                   yref: "paper", y: 1.0, showarrow: false});
      const axis = i ? String(i + 1) : "";
      const centres = h.bin_edges.slice(0, -1).map((e, j) => (e + h.bin_edges[j + 1]) / 2);
      traces.push({type: "bar", x: centres, y: h.observed, name: places[h.place] + " observed", xaxis: "x" + axis,
                   yaxis: "y" + axis, marker: {color: config.colours[h.place]}});
      if (h.chance) traces.push({type: "scatter", mode: "lines", x: centres, y: h.chance, xaxis: "x" + axis,
                                 yaxis: "y" + axis, name: places[h.place] + " chance", line: {color: "black", dash: "dot"}});
      if (h.threshold != null) shapes.push({type: "line", xref: "x" + axis, yref: "y" + axis + " domain", x0: h.threshold,
                                            x1: h.threshold, y0: 0, y1: 1, line: {color: "red", width: 2}});
    });
    const layout = Object.assign({grid: {rows: 1, columns: Math.max(parts.length, 1), pattern: "independent"}, shapes,
                    height: 360, margin: {t: 50}, legend: {orientation: "h", y: -0.3},
                    annotations: titles.concat([{text: "bars: top-1 cosines; dotted: what chance predicts; red: the threshold",
                                   xref: "paper", yref: "paper", x: 0, y: 1.14, showarrow: false}])}, axes);
    Plotly.newPlot($("histogram-chart"), traces, layout, {displaylogo: false, responsive: true});
  }

  function flowParams() {
    const url = new URL(window.location.href);
    const out = new URLSearchParams();
    for (const name of ["t_res", "t_mod", "max_rank", "depth", "every_edge"]) {
      const v = url.searchParams.get(name);
      if (v !== null && v !== "") out.set(name, v);
    }
    return out;
  }

  async function featurePage() {
    const key = body.dataset.key;
    const path = key.split("/").map(encodeURIComponent).join("/");
    const params = flowParams();
    const form = $("flow-controls");
    const fillControls = (given) => {
      for (const name of ["t_res", "t_mod", "max_rank", "depth", "every_edge"]) {
        const input = form.elements[name], v = given.get(name);
        if (input.type === "checkbox") input.checked = v === "true";
        else input.value = v !== null ? v : (input.defaultValue || "");
      }
    };
    fillControls(params);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const next = new URLSearchParams();
      for (const name of ["t_res", "t_mod", "max_rank", "depth"]) {
        if (form.elements[name].value !== "") next.set(name, form.elements[name].value);
      }
      if (form.elements.every_edge.checked) next.set("every_edge", "true");
      history.pushState(null, "", window.location.pathname + (next.toString() ? "?" + next : ""));
      loadFlow(path, next);
      loadTables(path, next);
    });
    window.addEventListener("popstate", () => {
      fillControls(flowParams());
      loadFlow(path, flowParams());
      loadTables(path, flowParams());
    });
    const detail = await api("/api/features/" + path);
    showFeature(detail);
    await Promise.all([loadFlow(path, params), loadTables(path, params), loadFamily(path), loadGraphs(path)]);
    setupSteering(key);
  }

  function showFeature(d) {
    const f = d.feature;
    $("feature-category").textContent = f.category ? f.category : (f.module + " feature (no category: only residual features are classified)");
    if (f.url) { $("feature-np").href = f.url; $("feature-np").hidden = false; }
    const list = $("feature-labels");
    list.replaceChildren();
    if (!d.labels.length) list.appendChild(el("li", "no label stored (flowdb labels import / fetch / contexts)"));
    for (const l of d.labels) {
      const li = list.appendChild(el("li"));
      li.appendChild(el("span", l.text, {class: "label-text"}));
      li.appendChild(el("span", " — " + l.source + (l.by && l.by !== l.source ? " (" + l.by + ")" : "") +
                        (l.score != null ? ", score " + fmt(l.score) : ""), {class: "label-source"}));
    }
    if (f.module === "res") {
      fillTable($("scores-table"), ["place", "score", "threshold", "chance", "verdict"], d.scores.map((s) => ({
        place: {res: "s(R): R(L-1)", mlp: "s(M): M(L)", att: "s(A): A(L)"}[s.place], score: s.score,
        threshold: s.threshold, chance: s.chance,
        verdict: s.score == null ? "no SAE there (counts as low)" : s.threshold != null && s.score >= s.threshold ? "high (at or above threshold)"
          : s.chance != null && s.score > s.chance ? "low: above chance, below threshold" : "low: at chance level"})));
      $("scores-rule").textContent = d.rule ? "Thresholds set by rule: " + d.rule : "";
    }
  }

  let current = null, flowAsked = 0;

  async function loadFlow(path, params) {
    const graphDiv = $("flow-graph"), message = $("flow-message");
    document.querySelectorAll(".downloads a").forEach((a) => {
      a.href = "/api/download/" + a.dataset.fmt + "/" + path + (params.toString() ? "?" + params : "");
    });
    const mine = ++flowAsked;
    try {
      const answer = await api("/api/flow/" + path + (params.toString() ? "?" + params : ""));
      if (mine !== flowAsked) return;  // a later request's answer is the one to draw
      current = answer;
      showError(null);
    } catch (err) { if (mine === flowAsked) showError(err); return; }
    current.params = params;
    $("flow-note").textContent = current.nodes.length ? current.nodes.length + " features, " + current.edges.length +
      " edges, " + current.depth + " step(s) back and forward" + (current.more ? "; more edges than one step reads were cut" : "") : "";
    if (current.too_big) {
      message.hidden = false;
      message.replaceChildren(el("p", current.too_big.message));
      const table = message.appendChild(el("table", null, {class: "data"}));
      fillTable(table, ["layer", "module", "features"], current.too_big.counts);
      graphDiv.hidden = true;
      return;
    }
    message.hidden = true;
    graphDiv.hidden = false;
    body.dataset.flowNodes = String(current.nodes.length);
    FlowView.draw(graphDiv, current, config, (key, event) => {
      if ($("expand-mode").checked || event.shiftKey) expand(key);
      else window.location.href = featureHref(key) + (current.params.toString() ? "?" + current.params : "");
    });
  }

  async function expand(key) {
    try {
      const part = await api("/api/neighbours/" + key.split("/").map(encodeURIComponent).join("/") +
                             (current.params.toString() ? "?" + current.params : ""));
      FlowView.merge(current, part);
      $("flow-note").textContent = "expanded " + key + ": " + part.edges.length + " edge(s)" +
        (part.more ? " (capped at " + part.cap + " each way)" : "") + "; " + current.nodes.length + " features shown";
      body.dataset.flowNodes = String(current.nodes.length);
      FlowView.draw($("flow-graph"), current, config, null);
    } catch (err) { showError(err); }
  }

  async function loadTables(path, params) {
    const query = params.toString() ? "?" + params : "";
    const jobs = [["lineage", "lineage-table"], ["descendants", "descendants-table"]].map(async ([name, id]) => {
      const table = $(id);
      try {
        const answer = await api("/api/" + name + "/" + path + query);
        fillTable(table, answer.columns, answer.rows);
        if (name === "lineage") $("lineage-note").textContent = answer.note ? "Thresholds: " + answer.note : "";
      } catch (err) {
        table.replaceChildren(el("caption", err.message));
      }
    });
    await Promise.all(jobs);
  }

  // The feature's relatives in linked packs: the family template, above-threshold ones.
  async function loadFamily(path) {
    const table = $("family-table");
    try {
      const answer = await api("/api/family/" + path + "?above_only=true");
      fillTable(table, ["link", "relative_key", "cosine", "relative_category", "category", "relative_label", "relative_url"],
                answer.rows);
    } catch (err) {
      table.replaceChildren(el("caption", err.message));
    }
  }

  // The attribution graphs this feature's nodes are in, each linked to its graph page.
  async function loadGraphs(path) {
    const table = $("feature-graphs-table");
    try {
      const answer = await api("/api/feature-graphs/" + path);
      const columns = ["graph", "prompt", "node_id", "position", "token", "activation", "influence"];
      const rows = answer.graphs.map((r) => Object.assign({graph: r.slug}, r));
      fillTable(table, columns, rows);
      linkColumn(table, columns, rows, "graph", (row) => graphHref(row.slug) + "?focus=" + encodeURIComponent(row.node_id));
      if (answer.more) $("feature-graphs-note").textContent += " The first " + answer.limit + " rows are shown.";
    } catch (err) {
      table.replaceChildren(el("caption", err.message));
    }
  }

  function setupSteering(key) {
    const unavailable = body.dataset.steeringMessage;
    const form = $("steering-form");
    if (unavailable) {
      $("steering-unavailable").textContent = unavailable;
      $("steering-unavailable").hidden = false;
      form.hidden = true;
      return;
    }
    let polling = null;
    const show = (status) => {
      const job = status.job;
      if (!job) return;
      const progress = job.tokens_total ? " (" + job.tokens_done + " of " + job.tokens_total + " tokens)" : "";
      $("steering-progress").textContent = job.state + ": " + (job.error || job.stage) + progress +
        (job.features.length ? "; steering " + job.features.length + " feature(s)" : "");
      $("steering-default").textContent = job.default || "";
      $("steering-steered").textContent = job.steered || "";
      if (!["queued", "loading", "running"].includes(job.state)) { clearInterval(polling); polling = null; }
    };
    const poll = () => { if (!polling) polling = setInterval(async () => show(await api("/api/steer")), 700); };
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const settings = {feature: key};
      for (const name of ["prompt", "strategy", "schedule"]) settings[name] = form.elements[name].value;
      for (const name of ["s", "max_new_tokens"]) {  // numbers as JSON numbers; an empty box takes the default
        const value = form.elements[name].value;
        if (value !== "") settings[name] = Number(value);
      }
      try {
        await api("/api/steer/start", {method: "POST", body: JSON.stringify(settings),
                                       headers: {"Content-Type": "application/json", Accept: "application/json"}});
        showError(null);
        poll();
      } catch (err) { showError(err); }
    });
    $("steering-cancel").addEventListener("click", async () => {
      try { show(await api("/api/steer/cancel", {method: "POST"})); } catch (err) { showError(err); }
    });
  }

  async function searchPage() {
    const text = new URL(window.location.href).searchParams.get("q") || "";
    if (!text.trim()) { $("search-summary").textContent = "Type a feature reference or words of a label above."; return; }
    const answer = await api("/api/search?limit=50&q=" + encodeURIComponent(text));
    if (answer.feature) { window.location.href = featureHref(answer.feature); return; }
    $("search-summary").textContent = answer.results.length + " feature(s) with a label matching \u201c" + text + "\u201d, best first";
    fillTable($("search-results"), ["key", "category", "matched", "source", "score", "url"], answer.results);
  }

  async function consolePage() {
    const show = (answer) => {
      $("console-note").textContent = answer.truncated && answer.note ? answer.note
        : answer.total != null ? answer.total + " row(s)" : (answer.note ? "Thresholds: " + answer.note : "");
      fillTable($("console-table"), answer.columns, answer.rows);
      const graphDiv = $("console-graph");
      const g = answer.graph;
      graphDiv.hidden = !(g && g.nodes.length);
      if (g && g.nodes.length) drawConsoleGraph(graphDiv, g);
    };
    $("cypher-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        let params;
        try { params = JSON.parse($("cypher-params").value || "{}"); } catch (err) { throw new Error("the parameters are not JSON"); }
        show(await api("/api/cypher", {method: "POST", body: JSON.stringify({statement: $("cypher-statement").value, params}),
                                       headers: {"Content-Type": "application/json", Accept: "application/json"}}));
        showError(null);
      } catch (err) { showError(err); }
    });
    const templates = (await api("/api/templates")).templates;
    const select = $("template-name");
    templates.forEach((t) => select.appendChild(el("option", t.name, {value: t.name})));
    const paramsBox = $("template-params");
    const fillParams = () => {
      const t = templates.find((x) => x.name === select.value);
      $("template-answers").textContent = t.answers;
      paramsBox.replaceChildren();
      for (const p of t.params) {
        const label = paramsBox.appendChild(el("label", p.name + (p.required ? " *" : "") + " "));
        label.appendChild(el("input", null, {name: p.name, placeholder: p.default == null ? p.type : String(p.default), title: p.doc}));
      }
    };
    select.addEventListener("change", fillParams);
    fillParams();
    $("template-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const query = new URLSearchParams();
      paramsBox.querySelectorAll("input").forEach((i) => { if (i.value !== "") query.set(i.name, i.value); });
      try { show(await api("/api/templates/" + encodeURIComponent(select.value) + "?" + query)); showError(null); }
      catch (err) { showError(err); }
    });
  }

  // Console answers that hold nodes: features on the flow layout, anything else in a circle.
  function drawConsoleGraph(div, g) {
    const features = g.nodes.filter((n) => n.properties.layer != null && n.properties.module);
    if (features.length === g.nodes.length) {
      const byId = Object.fromEntries(g.nodes.map((n) => [n.id, n.properties.key || n.id]));
      const view = {nodes: features.map((n) => Object.assign({}, n.properties)), edges: g.relationships
        .filter((r) => r.properties.cosine != null)
        .map((r) => ({source: byId[r.start], target: byId[r.end], kind: r.type.toLowerCase(),
                      cosine: r.properties.cosine, rank: r.properties.rank, status: r.properties.above ? "threshold" : "unknown"}))};
      FlowView.draw(div, view, config, (key) => { window.location.href = featureHref(key); });
      return;
    }
    const n = g.nodes.length, at = {};
    g.nodes.forEach((node, i) => { at[node.id] = [Math.cos(2 * Math.PI * i / n), Math.sin(2 * Math.PI * i / n)]; });
    const shapes = g.relationships.map((r) => ({type: "line", x0: at[r.start][0], y0: at[r.start][1], x1: at[r.end][0],
                                                y1: at[r.end][1], line: {color: "#999"}, layer: "below"}));
    Plotly.newPlot(div, [{x: g.nodes.map((x) => at[x.id][0]), y: g.nodes.map((x) => at[x.id][1]), mode: "markers+text",
      text: g.nodes.map((x) => FlowView.esc(x.labels.join(":") + " " + (x.properties.key || x.properties.name || ""))),
      hovertext: g.nodes.map((x) => FlowView.esc(JSON.stringify(x.properties))), hoverinfo: "text", textposition: "top center",
      marker: {size: 14}}], {shapes, xaxis: {visible: false}, yaxis: {visible: false}, height: 420, margin: {t: 10}},
      {displaylogo: false});
  }

  setupFind();
  const pages = {packs: packsPage, pack: packPage, feature: featurePage, search: searchPage, console: consolePage,
                 graphs: graphsPage, graph: graphPage};
  const run = pages[body.dataset.page];
  if (run) run().then(() => { body.dataset.ready = "1"; }, (err) => { showError(err); body.dataset.ready = "error"; });
})();
