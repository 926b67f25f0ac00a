// The flow graph view, drawn with plotly.js: layers along x, residual features in the
// middle rows, MLP inputs above and attention inputs below. Shared by the explorer's
// feature page and flowdb.show() in notebooks. Every label is escaped before plotly sees
// it (plotly reads a subset of HTML in text), so a label is shown as text, never markup.
(function (global) {
  "use strict";
  const SYMBOL = {translated: "circle", processed: "diamond", newborn: "star", "from-nowhere": "x"};
  const DASH = {threshold: "solid", "above-chance": "dash", chance: "dot", unknown: "dot"};
  const STATUS_TEXT = {
    threshold: "at or above its threshold", "above-chance": "above chance only",
    chance: "at chance level", unknown: "no chance level stored"};
  const KIND_MODULE = {residual: "res", mlp: "mlp", attention: "att"};

  // Plotly reads a few tags (<b>, <br>, <a href=...>) and the entities &amp; &lt; &gt;
  // (not &quot;) in text: with every < and & escaped no tag can form, and quotes stay as typed.
  function esc(value) {
    return String(value == null ? "" : value).replace(/[&<>]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;"}[c]));
  }

  function wrapped(text, width, lines) {
    const words = String(text || "").split(/\s+/).filter(Boolean);
    const out = [];
    let line = "";
    for (const word of words) {
      const next = line ? line + " " + word : word;
      if (next.length > width && line) { out.push(line); line = word; } else { line = next; }
      if (out.length === lines) break;
    }
    if (out.length < lines && line) out.push(line);
    const cut = out.slice(0, lines).map((l) => (l.length > width ? l.slice(0, width - 1) + "…" : l));
    if (out.length >= lines && words.join(" ").length > cut.join(" ").length && cut.length) {
      cut[cut.length - 1] = cut[cut.length - 1].replace(/…?$/, " …");
    }
    return cut;
  }

  // Rows chosen to keep edges from crossing, as flowdb.views.plots.flow_layout does.
  function layout(nodes, edges, offsets) {
    const sources = {}, targets = {}, pos = {};
    for (const e of edges) {
      (sources[e.target] = sources[e.target] || []).push(e.source);
      (targets[e.source] = targets[e.source] || []).push(e.target);
    }
    const meanRow = (keys) => {
      const rows = (keys || []).filter((k) => k in pos).map((k) => pos[k][1]);
      return rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : 0;
    };
    const byKey = (f) => (a, b) => (f(a) - f(b)) || (a < b ? -1 : a > b ? 1 : 0);
    const layers = [...new Set(nodes.map((n) => n.layer))].sort((a, b) => a - b);
    for (const layer of layers) {
      const of = (m) => nodes.filter((n) => n.layer === layer && n.module === m).map((n) => n.key);
      const res = of("res").sort(byKey((k) => meanRow(sources[k])));
      res.forEach((k, i) => { pos[k] = [layer, i - (res.length - 1) / 2]; });
      const top = res.length ? (res.length - 1) / 2 : 0;
      of("mlp").sort(byKey((k) => meanRow(targets[k]))).forEach((k, i) => {
        pos[k] = [layer + (offsets.mlp || 0), top + 1 + i]; });
      of("att").sort(byKey((k) => -meanRow(targets[k]))).forEach((k, i) => {
        pos[k] = [layer + (offsets.att || 0), -top - 1 - i]; });
    }
    return pos;
  }

  function name(n) { return n.layer + "/" + n.module + "/" + n.index; }

  function nodeHover(n) {
    const lines = ["<b>" + esc(n.key) + "</b>", esc([n.role, n.category, n.module].filter(Boolean).join(", "))];
    if (n.label) lines.push(esc(n.label));
    const scores = ["res", "mlp", "att"].filter((p) => n["s_" + p] != null)
      .map((p) => "s(" + p[0].toUpperCase() + ")=" + Number(n["s_" + p]).toFixed(3));
    if (scores.length) lines.push(scores.join(" "));
    return lines.join("<br>");
  }

  function figure(view, config) {
    const nodes = view.nodes, edges = view.edges;
    const pos = layout(nodes, edges, config.offsets || {});
    const shapes = [], annotations = [], mid = {x: [], y: [], text: []};
    for (const e of edges) {
      if (!(e.source in pos) || !(e.target in pos)) continue;
      const [x0, y0] = pos[e.source], [x1, y1] = pos[e.target];
      const colour = config.colours[KIND_MODULE[e.kind]];
      shapes.push({type: "line", x0, y0, x1, y1, layer: "below",
                   line: {color: colour, width: 1 + 4 * Math.max(e.cosine, 0), dash: DASH[e.status] || "dot"},
                   opacity: 0.7});
      const mx = x0 + 0.55 * (x1 - x0), my = y0 + 0.55 * (y1 - y0);
      annotations.push({x: mx, y: my, text: Number(e.cosine).toFixed(2), showarrow: false,
                        font: {size: 10, color: "#333"}, bgcolor: "rgba(255,255,255,0.85)"});
      mid.x.push(mx); mid.y.push(my);
      mid.text.push(esc(e.source) + " → " + esc(e.target) + "<br>" + esc(e.kind) + " cosine " +
                    Number(e.cosine).toFixed(3) + " (rank " + e.rank + ")<br>" + esc(STATUS_TEXT[e.status] || e.status));
    }
    const data = [{x: mid.x, y: mid.y, mode: "markers", hoverinfo: "text", hovertext: mid.text, name: "edges",
                   showlegend: false, marker: {size: 12, color: "rgba(0,0,0,0)"}}];
    for (const module of ["res", "mlp", "att"]) {
      const group = nodes.filter((n) => n.module === module && n.key in pos);
      if (!group.length) continue;
      data.push({
        x: group.map((n) => pos[n.key][0]), y: group.map((n) => pos[n.key][1]), mode: "markers+text",
        name: config.names[module], legendgroup: module, showlegend: false,
        customdata: group.map((n) => n.key), hoverinfo: "text",
        hovertext: group.map(nodeHover), textposition: module === "res" ? "bottom center" : "middle left",
        text: group.map((n) => ["<b>" + esc(name(n)) + "</b>" + (n.category ? " · " + esc(n.category) : "")]
          .concat(wrapped(n.label, 26, 2).map(esc)).join("<br>")),
        textfont: {size: 10},
        marker: {size: 16, color: config.colours[module], line: {width: 1, color: "white"},
                 symbol: group.map((n) => SYMBOL[n.category] || "square")}});
      data.push({x: [null], y: [null], mode: "markers", name: config.names[module], legendgroup: module,
                 marker: {size: 12, color: config.colours[module], symbol: module === "res" ? "circle" : "square"}});
    }
    const seed = nodes.filter((n) => n.role === "seed" && n.key in pos);
    data.push({x: seed.map((n) => pos[n.key][0]), y: seed.map((n) => pos[n.key][1]), mode: "markers",
               name: "seed", hoverinfo: "skip",
               marker: {size: 26, symbol: "circle-open", color: "black", line: {width: 3}}});
    const layers = [...new Set(nodes.map((n) => n.layer))].sort((a, b) => a - b);
    const ys = Object.values(pos).map((p) => p[1]), xs = Object.values(pos).map((p) => p[0]);
    const rows = ys.length ? Math.max(...ys) - Math.min(...ys) + 1 : 1;
    return {data, layout: {
      shapes, annotations, hovermode: "closest", plot_bgcolor: "white", margin: {l: 140, r: 30, t: 30, b: 40},
      height: Math.max(420, 64 * rows + 160),
      xaxis: {tickvals: layers, ticktext: layers.map((l) => "layer " + l), showgrid: false, zeroline: false,
              range: [Math.min(...xs) - 0.8, Math.max(...xs) + 0.5]},
      yaxis: {visible: false, range: [Math.min(...ys) - 1, Math.max(...ys) + 0.7]},
      legend: {orientation: "h", y: 1.06}}};
  }

  // Draw a view into div; onNode(key, event) is called when a node is clicked.
  function draw(div, view, config, onNode) {
    const fig = figure(view, config);
    const shown = global.Plotly.react(div, fig.data, fig.layout, {displaylogo: false, responsive: true});
    if (onNode && !div.dataset.flowClick) {
      div.dataset.flowClick = "1";
      div.on("plotly_click", (event) => {
        const point = event.points && event.points[0];
        if (point && typeof point.customdata === "string") onNode(point.customdata, event.event || {});
      });
    }
    return shown;
  }

  // Add a neighbourhood to a view; its new nodes get roles relative to the seed.
  function merge(view, part) {
    const seed = view.nodes.find((n) => n.role === "seed");
    const known = new Set(view.nodes.map((n) => n.key));
    for (const n of part.nodes) {
      if (known.has(n.key)) continue;
      n.role = n.module !== "res" ? "input" : (seed && n.layer < seed.layer ? "ancestor" : "descendant");
      view.nodes.push(n);
      known.add(n.key);
    }
    const edgeKey = (e) => e.source + ">" + e.target + ">" + e.kind;
    const edges = new Set(view.edges.map(edgeKey));
    for (const e of part.edges) if (!edges.has(edgeKey(e))) { view.edges.push(e); edges.add(edgeKey(e)); }
    return view;
  }

  global.FlowView = {draw, figure, layout, merge, esc};
})(window);
