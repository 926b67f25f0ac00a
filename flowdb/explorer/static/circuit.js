// An attribution graph drawn with plotly.js, as flow.js draws a flow graph: the prompt's
// positions along x (its tokens as tick labels), input tokens at the bottom, layers up the
// y axis, logits on top; links as lines whose width is |weight| and colour its sign;
// supernodes as shaded boxes named by their label. Every text plotly sees goes through
// FlowView.esc (plotly reads a subset of HTML in text), so labels and tokens stay text.
(function (global) {
  "use strict";
  const esc = (value) => global.FlowView.esc(value);
  const SIGN_COLOUR = {positive: "#2b6cb0", negative: "#c53030"};
  const STYLE = {  // kind (and for features, whether tied to a stored Feature) -> marker
    tied: {name: "feature (tied: click to open)", symbol: "circle", color: "#1565c0"},
    feature: {name: "feature", symbol: "circle", color: "#9fb3c8"},
    error: {name: "error", symbol: "square", color: "#9e9e9e"},
    embedding: {name: "input token", symbol: "triangle-up", color: "#6d4c41"},
    logit: {name: "logit", symbol: "diamond", color: "#2e7d32"}};
  const GROUP_RGB = ["230,85,13", "49,163,84", "117,107,177", "214,97,107", "49,130,189", "140,109,49", "23,190,207"];

  function styleOf(n) { return n.kind === "feature" && n.key ? "tied" : n.kind; }

  function shortened(text, width) {
    const t = String(text == null ? "" : text).replace(/\s+/g, " ").trim();
    return t.length > width ? t.slice(0, width - 1) + "…" : t;
  }

  // A logit's clerp is circuit-tracer's 'Output " Austin" (p=0.451)': its quoted token labels it.
  function nodeText(n) {
    const output = n.kind === "logit" && /^Output "(.*)" \(p=[^)]*\)$/.exec(n.clerp || "");
    return shortened(output ? JSON.stringify(output[1]) : n.clerp, 16);
  }

  function token(view, position) {
    const tokens = view.graph.prompt_tokens || [];
    return position < tokens.length ? tokens[position] : "pos " + position;
  }

  // Where each node goes: a position's column is as wide as its busiest (position, row) cell
  // needs (the last position, where logits are read, is usually the busiest), and the nodes
  // of a cell share its width in the graph's order. centres: each position's tick.
  function positions(nodes, width) {
    const cells = {}, busiest = Array(width).fill(1);
    for (const n of nodes) (cells[n.ctx_idx + "," + n.row] = cells[n.ctx_idx + "," + n.row] || []).push(n);
    for (const cell of Object.values(cells)) busiest[cell[0].ctx_idx] = Math.max(busiest[cell[0].ctx_idx], cell.length);
    const starts = [], widths = busiest.map((n) => Math.max(1, 0.45 * n));
    widths.reduce((x, w, p) => { starts[p] = x; return x + w; }, 0);
    const at = {}, upper = {};
    for (const cell of Object.values(cells)) {
      const p = cell[0].ctx_idx;
      cell.forEach((n, i) => {
        at[n.node_id] = [starts[p] + widths[p] * (i + 0.5) / cell.length, n.row];
        upper[n.node_id] = i % 2 === 0;  // labels alternate above and below, so neighbours' do not collide
      });
    }
    return {at, upper, centres: widths.map((w, p) => starts[p] + w / 2), end: starts[width - 1] + widths[width - 1]};
  }

  function nodeHover(view, n) {
    const lines = ["<b>" + esc(n.node_id) + "</b> " + esc(n.feature_type),
                   "position " + n.ctx_idx + " (" + esc(JSON.stringify(token(view, n.ctx_idx))) + "), layer " + esc(n.layer)];
    if (n.clerp) lines.push(esc(n.clerp));
    if (n.key) lines.push("stored feature " + esc(n.key) + (n.label ? ": " + esc(shortened(n.label, 60)) : ""));
    const numbers = [["influence", n.influence], ["activation", n.activation], ["p", n.kind === "logit" ? n.token_prob : null]]
      .filter(([, v]) => v != null).map(([k, v]) => k + " " + Number(v).toFixed(3));
    if (numbers.length) lines.push(numbers.join(", "));
    return lines.join("<br>");
  }

  function linkShapes(view, at) {
    const shapes = [], mid = {x: [], y: [], text: []};
    const strongest = Math.max(1e-12, ...view.links.map((l) => Math.abs(l.weight)));
    for (const l of view.links) {
      if (!(l.source in at) || !(l.target in at)) continue;
      const [x0, y0] = at[l.source], [x1, y1] = at[l.target];
      shapes.push({type: "line", x0, y0, x1, y1, layer: "below", opacity: 0.55,
                   line: {color: SIGN_COLOUR[l.weight >= 0 ? "positive" : "negative"],
                          width: 0.5 + 5 * Math.abs(l.weight) / strongest}});
      mid.x.push((x0 + x1) / 2); mid.y.push((y0 + y1) / 2);
      mid.text.push(esc(l.source) + " → " + esc(l.target) + "<br>weight " + Number(l.weight).toFixed(4));
    }
    return {shapes, trace: {x: mid.x, y: mid.y, mode: "markers", hoverinfo: "text", hovertext: mid.text,
                            showlegend: false, name: "links", marker: {size: 10, color: "rgba(0,0,0,0)"}}};
  }

  // A shaded box around each supernode's drawn members, its name above the box's left corner.
  function supernodeBoxes(view, at) {
    const shapes = [], annotations = [];
    view.supernodes.filter((s) => s.drawn.length).forEach((s, i) => {
      const rgb = GROUP_RGB[i % GROUP_RGB.length], colour = "rgb(" + rgb + ")";
      const xs = s.drawn.map((id) => at[id][0]), ys = s.drawn.map((id) => at[id][1]);
      const box = {x0: Math.min(...xs) - 0.18, x1: Math.max(...xs) + 0.18, y0: Math.min(...ys) - 0.4, y1: Math.max(...ys) + 0.4};
      shapes.push(Object.assign({type: "rect", layer: "below", fillcolor: "rgba(" + rgb + ",0.12)",
                                 line: {color: colour, width: 1.5}}, box));
      const more = s.drawn.length < s.node_ids.length ? " (" + s.drawn.length + " of " + s.node_ids.length + " drawn)" : "";
      annotations.push({x: box.x0, y: box.y1, xanchor: "left", yanchor: "bottom", showarrow: false,
                        text: esc(shortened(s.name, 40) + more), font: {size: 10, color: colour},
                        bgcolor: "rgba(255,255,255,0.8)"});
    });
    return {shapes, annotations};
  }

  function figure(view, options) {
    const width = Math.max(1, (view.graph.prompt_tokens || []).length, ...view.nodes.map((n) => n.ctx_idx + 1));
    const {at, upper, centres, end} = positions(view.nodes, width);
    const links = linkShapes(view, at), boxes = supernodeBoxes(view, at);
    const data = [links.trace];
    for (const [style, look] of Object.entries(STYLE)) {
      const group = view.nodes.filter((n) => styleOf(n) === style);
      if (!group.length) continue;
      data.push({
        x: group.map((n) => at[n.node_id][0]), y: group.map((n) => at[n.node_id][1]), name: look.name,
        mode: style === "error" || style === "embedding" ? "markers" : "markers+text",
        text: group.map((n) => esc(nodeText(n))), textfont: {size: 9, color: "#444"},
        textposition: group.map((n) => (upper[n.node_id] ? "top center" : "bottom center")),
        customdata: group.map((n) => n.node_id), hoverinfo: "text", hovertext: group.map((n) => nodeHover(view, n)),
        marker: {size: style === "tied" ? 13 : 11, symbol: look.symbol, color: look.color,
                 line: {width: group.map((n) => (n.is_target_logit ? 2.5 : 1)),
                        color: group.map((n) => (n.is_target_logit ? "black" : "white"))}}});
    }
    const focus = view.nodes.filter((n) => n.node_id === (options || {}).focus);
    if (focus.length) {
      data.push({x: focus.map((n) => at[n.node_id][0]), y: focus.map((n) => at[n.node_id][1]), mode: "markers",
                 name: "from the feature page", hoverinfo: "skip", marker: {size: 24, symbol: "circle-open", color: "black",
                                                                          line: {width: 3}}});
    }
    const rows = [...new Set(view.nodes.map((n) => n.row))].sort((a, b) => a - b);
    const top = Math.max(0, ...rows), logitRows = new Set(view.nodes.filter((n) => n.kind === "logit").map((n) => n.row));
    return {data, layout: {
      shapes: boxes.shapes.concat(links.shapes), annotations: boxes.annotations, hovermode: "closest",
      plot_bgcolor: "white", margin: {l: 60, r: 20, t: 40, b: 80}, height: Math.max(460, 56 * rows.length + 180),
      legend: {orientation: "h", y: 1.08},
      xaxis: {tickvals: centres, ticktext: centres.map((x, p) => esc(shortened(token(view, p), 14))), tickangle: -30,
              range: [-0.1, end + 0.1], showgrid: true, gridcolor: "#f0f0f0", zeroline: false},
      yaxis: {tickvals: rows, ticktext: rows.map((r) => (r === -1 ? "tokens" : logitRows.has(r) ? "logits" : "L" + r)),
              range: [Math.min(-1, ...rows) - 0.7, top + 0.9], zeroline: false, gridcolor: "#f0f0f0"}}};
  }

  // Draw view into div; onFeature(key) is called when a node tied to a stored feature is clicked.
  function draw(div, view, options, onFeature) {
    const fig = figure(view, options);
    const shown = global.Plotly.react(div, fig.data, fig.layout, {displaylogo: false, responsive: true});
    const keys = Object.fromEntries(view.nodes.filter((n) => n.key).map((n) => [n.node_id, n.key]));
    div.on("plotly_click", (event) => {
      const point = event.points && event.points[0];
      if (point && keys[point.customdata]) onFeature(keys[point.customdata]);
    });
    return shown;
  }

  global.CircuitView = {draw, figure, positions};
})(window);
