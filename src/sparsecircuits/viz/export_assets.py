"""CSS and the small vanilla-JS node inspector of the exported HTML page (``export_html.py``).

The script reads ``#circuit-data`` ({"circuit": circuit.json, "analysis": analysis.json}) and
``#figure-data`` (the Plotly figure), draws the graph, and on a node click fills ``#inspector``
with the node's facts, its in/out edges and its snippets as token heatmaps. Token text is only
ever set through ``textContent``.
"""

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; }
header { padding: 10px 16px; border-bottom: 1px solid #ddd; background: #fafafa; }
header h1 { font-size: 18px; margin: 0 0 4px 0; }
header .facts { font-size: 13px; color: #444; }
main { display: flex; gap: 8px; }
#graph { flex: 3; min-width: 0; }
#inspector { flex: 2; max-width: 640px; padding: 8px 14px; border-left: 1px solid #ddd;
  font-size: 13px; overflow-y: auto; max-height: 100vh; position: sticky; top: 0; }
#inspector h2 { font-size: 16px; margin: 6px 0; }
#inspector h3 { font-size: 14px; margin: 12px 0 4px 0; }
table { border-collapse: collapse; }
td, th { padding: 1px 8px 1px 0; text-align: left; font-variant-numeric: tabular-nums; }
.edge { cursor: pointer; color: #1a4f8b; }
.edge:hover { text-decoration: underline; }
.snip { font-family: ui-monospace, monospace; font-size: 12px; margin: 3px 0;
  white-space: pre-wrap; word-break: break-all; line-height: 1.6; }
.snip .q { color: #888; display: inline-block; min-width: 9em; }
.tok { border-radius: 2px; }
.tok.focus { outline: 2px solid #000; }
.muted { color: #888; }
"""

JS = r"""
(function () {
  const data = JSON.parse(document.getElementById('circuit-data').textContent);
  const fig = JSON.parse(document.getElementById('figure-data').textContent);
  const circuit = data.circuit, analysis = data.analysis;
  const gd = document.getElementById('graph');
  const panel = document.getElementById('inspector');
  Plotly.newPlot(gd, fig.data, fig.layout, {responsive: true, displaylogo: false});
  const nodeTrace = fig.data.length - 1;
  const ids = fig.data[nodeTrace].customdata;
  const nodes = {};
  circuit.nodes.forEach(n => { nodes[n.id] = n; });
  const inE = {}, outE = {};
  function addEdge(src, dst, kind, w) {
    (outE[src] = outE[src] || []).push({other: dst, kind: kind, weight: w});
    (inE[dst] = inE[dst] || []).push({other: src, kind: kind, weight: w});
  }
  circuit.edges.forEach(e => addEdge(e.src, e.dst, e.kind, e.weight));
  if (analysis && analysis.targets) {
    Object.entries(analysis.targets.direct).forEach(([src, ws]) =>
      ws.forEach((w, i) => addEdge(src, 'logit.' + i, 'logit', w)));
  }
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function fmt(x) { return x === null || x === undefined ? 'n/a' : Number(x).toPrecision(4); }
  function shown(t) { return t.replace(/\n/g, '\u21b5\n').replace(/\t/g, '\u2192'); }
  function color(a, scale) {
    if (!scale || !a) return 'transparent';
    const f = Math.min(1, Math.abs(a) / scale).toFixed(3);
    return a > 0 ? 'rgba(33,102,172,' + f + ')' : 'rgba(178,24,43,' + f + ')';
  }
  function tokens(toks, acts, focus, scale) {
    const div = el('div', null, 'snip');
    toks.forEach((t, i) => {
      const s = el('span', shown(t), 'tok' + (i === focus ? ' focus' : ''));
      s.style.background = color(acts[i], scale);
      s.title = 'activation ' + fmt(acts[i]);
      div.appendChild(s);
    });
    return div;
  }
  function edgeList(title, list) {
    panel.appendChild(el('h3', title + ' (' + list.length + ')'));
    if (!list.length) { panel.appendChild(el('div', 'none', 'muted')); return; }
    const tab = el('table');
    list.slice().sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, 40)
      .forEach(e => {
        const tr = el('tr');
        const td = el('td', e.other, 'edge');
        td.onclick = () => show(e.other);
        tr.append(td, el('td', e.kind), el('td', fmt(e.weight)));
        tab.appendChild(tr);
      });
    panel.appendChild(tab);
    if (list.length > 40) panel.appendChild(el('div', '(strongest 40 shown)', 'muted'));
  }
  function highlight(id) {
    const sizes = ids.map(x => (x === id ? 16 : 9));
    const widths = ids.map(x => (x === id ? 3 : 0.5));
    Plotly.restyle(gd, {'marker.size': [sizes], 'marker.line.width': [widths]}, [nodeTrace]);
  }
  function show(id) {
    panel.replaceChildren();
    highlight(id);
    const n = nodes[id];
    panel.appendChild(el('h2', id));
    if (!n) {
      const t = analysis && analysis.targets;
      const i = Number(id.split('.')[1]);
      if (t) panel.appendChild(el('div', 'target logit ' + JSON.stringify(t.tokens[i])));
      edgeList('direct links from residual writes (ln_f gain x unembedding)', inE[id] || []);
      return;
    }
    const facts = el('table');
    const rows = [['location', n.loc], ['layer', n.layer], ['channel index', n.index],
      ['tau (mask logit)', fmt(n.tau)], ['ablation delta (nats)', fmt(n.delta)]];
    if (n.head !== null) rows.splice(3, 0, ['head.channel', n.head + '.' + n.channel]);
    const a = analysis && analysis.nodes[id];
    if (a) {
      rows.push(['site', a.site]);
      Object.entries(a.stats).forEach(([k, v]) => rows.push([k + ' (pretraining)', fmt(v)]));
      rows.push(['mean at final token, A / B', fmt(a.task.mean_a) + ' / ' + fmt(a.task.mean_b)]);
    }
    rows.forEach(([k, v]) => {
      const tr = el('tr'); tr.append(el('td', k), el('td', String(v))); facts.appendChild(tr);
    });
    panel.appendChild(facts);
    edgeList('incoming edges', inE[id] || []);
    edgeList('outgoing edges', outE[id] || []);
    if (!a) {
      panel.appendChild(el('p', 'no analysis.json: run sparsecircuits analyze', 'muted'));
      return;
    }
    const scale = Math.max(Math.abs(a.stats.min), Math.abs(a.stats.max));
    [['top', 'top activations (quantile 1-q)'], ['bottom', 'bottom activations (quantile q)']]
      .forEach(([side, title]) => {
        panel.appendChild(el('h3', title + ' on ' + analysis.corpus + ' text'));
        a.samples[side].forEach(s => {
          const d = tokens(s.tokens, s.acts, s.focus, scale);
          d.prepend(el('span', 'q=' + s.q + ' ' + fmt(s.value) + ' ', 'q'));
          panel.appendChild(d);
        });
      });
    panel.appendChild(el('h3', 'task prompts (first pair, last 40 tokens): A then B'));
    [a.task.a[0], a.task.b[0]].forEach(p => {
      if (!p) return;
      const k = Math.max(0, p.tokens.length - 40);
      panel.appendChild(tokens(p.tokens.slice(k), p.acts.slice(k), p.tokens.length - 1 - k, scale));
    });
  }
  gd.on('plotly_click', ev => {
    const p = ev.points.find(q => q.curveNumber === nodeTrace);
    if (p) show(p.customdata);
  });
})();
"""
