"""The report page's stylesheet and script (inlined once; no network). The script reads the JSON in
<script id="report-data" type="application/json">: selections, drill-down details, thumbnails, differences."""

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#fafbfc}
nav{position:sticky;top:0;z-index:20;background:#1d2330;padding:.45rem 1.5rem;display:flex;flex-wrap:wrap;
  align-items:center;gap:.3rem 1.1rem}
nav a{color:#dfe6f0;text-decoration:none;font-size:.92rem}
nav .selector{margin-left:auto;color:#dfe6f0;font-size:.9rem}
nav select,.controls select{font-size:.9rem;padding:.15rem .3rem;max-width:32rem}
main{padding:0 1.5rem 3rem;max-width:none}
h1{margin:1.1rem 0 .2rem}.summary{color:#5a6475;margin-top:0}
section{margin-top:1.8rem;scroll-margin-top:5rem}h2{border-bottom:1px solid #d8dde6;padding-bottom:.3rem}
h3{margin:.6rem 0 .3rem;font-size:1.02rem}
.headline{background:#fff;border:1px solid #e3e7ee;border-left:4px solid #21918c;border-radius:6px;padding:.5rem 1rem;
  margin:.6rem 0}
.headline li{margin:.15rem 0}
.figure{background:#fff;border:1px solid #e3e7ee;border-radius:6px;margin:.5rem 0;min-width:0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:.75rem;align-items:start}
.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:.75rem;align-items:start}
.controls{display:flex;flex-wrap:wrap;gap:.4rem 1.2rem;align-items:center;margin:.4rem 0}
.note{color:#3d4656;max-width:75rem}
#diff-figure{max-width:820px}
#drilldown{background:#fff;border:1px solid #e3e7ee;border-radius:6px;padding:.6rem 1rem;margin:.75rem 0}
#drilldown .empty{color:#5a6475}
.drill-plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:.5rem}
.numbers td{padding:.15rem .8rem .15rem 0}.numbers td:first-child{color:#5a6475}
.thumbs{display:flex;flex-wrap:wrap;gap:.5rem}.thumbs figure{margin:0;text-align:center;font-size:.75rem;width:96px}
.thumbs img{width:64px;height:64px;image-rendering:pixelated;border:1px solid #d8dde6}
.table-tools{display:flex;flex-wrap:wrap;gap:.5rem;align-items:center;margin:.5rem 0 .2rem}
.table-tools input{padding:.2rem .4rem;min-width:16rem}
.table-tools button,.table-tools a{font-size:.85rem}
.caption{color:#5a6475;font-size:.85rem;margin:.2rem 0}
.table-wrap{max-height:34rem;overflow:auto;border:1px solid #e3e7ee;border-radius:6px;background:#fff;margin:.3rem 0 1rem}
table{border-collapse:separate;border-spacing:0;font-size:.85rem;width:100%}
th{position:sticky;top:0;z-index:2;background:#eef1f6;text-align:left;padding:.35rem .6rem;cursor:pointer;white-space:nowrap}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
td{padding:.3rem .6rem;border-top:1px solid #eef0f4;white-space:nowrap;background:inherit}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr{background:#fff}tbody tr:nth-child(even){background:#f7f9fb}
th.pin,td.pin{position:sticky;z-index:1}th.pin{z-index:3}td.pin{background:#fff}tr:nth-child(even) td.pin{background:#f7f9fb}
pre{background:#fff;border:1px solid #e3e7ee;border-radius:6px;padding:1rem;overflow:auto;font-size:.85rem}
details{margin:.4rem 0}summary{cursor:pointer;font-weight:600}
.downloads a{margin-right:1.2rem;display:inline-block;margin-bottom:.3rem}
.inversion-gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:.75rem}
.inversion-gallery figure{margin:0;background:#fff;border:1px solid #e3e7ee;border-radius:6px;padding:.4rem}
.inversion-gallery img{width:100%;image-rendering:pixelated;display:block}
.inversion-gallery figcaption{font-size:.8rem;color:#3d4656;margin-top:.3rem}
.labelled{display:grid;grid-template-columns:auto 1fr;gap:0 .3rem;font-size:.7rem;color:#3d4656}
.labelled .cols{grid-column:2;display:flex}.labelled .cols span{flex:1;text-align:center}
.labelled .rows{display:flex;flex-direction:column}.labelled .rows span{flex:1;display:flex;align-items:center}
"""

JS = r"""
(function () {
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var state = {sel: 0, views: {}, pair: null};
  window.featrecReport = {data: DATA, state: state};

  function matches(meta) {
    if (!meta) { return true; }
    var fields = (DATA.selections[state.sel] || {}).fields || {};
    if (meta.sel) {
      for (var k in meta.sel) {
        if (Object.prototype.hasOwnProperty.call(fields, k) && fields[k] !== meta.sel[k]) { return false; }
      }
    }
    if (meta.group !== undefined && state.views[meta.group] !== meta.view) { return false; }
    return true;
  }

  function refresh() {
    document.querySelectorAll(".figure.linked").forEach(function (gd) {
      if (!gd.data) { return; }
      var visible = gd.data.map(function (t) { return matches(t.meta); });
      var same = gd.data.every(function (t, i) { return (t.visible !== false) === visible[i]; });
      if (!same) { Plotly.restyle(gd, {visible: visible}); }
    });
    if (state.pair) { showPair(state.pair[0], state.pair[1]); }
  }

  var selector = document.getElementById("selection");
  if (selector) {
    selector.addEventListener("change", function () { state.sel = Number(selector.value); refresh(); });
  }
  document.querySelectorAll("select.view-select").forEach(function (s) {
    state.views[s.dataset.group] = s.value;
    s.addEventListener("change", function () { state.views[s.dataset.group] = s.value; refresh(); });
  });

  // ------------------------------------------------------------------ drill-down
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in (attrs || {})) { e.setAttribute(k, attrs[k]); }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  var small = {template: "plotly_white", height: 260, margin: {t: 36, l: 56, r: 12, b: 44}, modebar: {orientation: "v"}};
  function layout(title, x, y, extra) {
    var l = JSON.parse(JSON.stringify(small));
    l.title = {text: title, x: 0.02, xanchor: "left", font: {size: 13}};
    l.xaxis = Object.assign({title: {text: x}}, (extra || {}).xaxis || {});
    l.yaxis = Object.assign({title: {text: y}}, (extra || {}).yaxis || {});
    return l;
  }
  var config = {displaylogo: false, responsive: true};

  function showPair(source, target) {
    var panel = document.getElementById("drilldown");
    if (!panel) { return; }
    var d = ((DATA.details || [])[state.sel] || {})[source + "|" + target];
    state.pair = [source, target];
    panel.innerHTML = "";
    panel.dataset.pair = source + "|" + target;
    var head = el("h3", {}, source + " → " + target + " · " + (DATA.selections[state.sel] || {}).label);
    panel.appendChild(head);
    if (!d) { panel.appendChild(el("p", {"class": "empty"}, "This pair did not run in this selection.")); return; }
    var table = el("table", {"class": "numbers"});
    d.nums.forEach(function (row) {
      var tr = el("tr"); tr.appendChild(el("td", {}, row[0])); tr.appendChild(el("td", {"data-metric": row[0]}, row[1]));
      table.appendChild(tr);
    });
    panel.appendChild(table);
    var plots = el("div", {"class": "drill-plots"});
    panel.appendChild(plots);
    var queue = [];
    function plot(id, traces, lay) {  // every div first, then the plots: each gets its final grid width
      var div = el("div", {id: id, "class": "figure"}); plots.appendChild(div);
      queue.push([div, traces, lay]);
    }
    if (d.alpha && d.alpha.x.length) {
      plot("drill-alpha", [{x: d.alpha.x, y: d.alpha.y, mode: "lines+markers", type: "scatter",
        hovertemplate: "alpha %{x}<br>held-out MSE %{y:.4~g}<extra></extra>"}],
        layout("Held-out MSE vs alpha (chosen: " + d.alpha.chosen + ")", "alpha", "held-out MSE",
               {xaxis: {type: "category"}}));
    }
    if (d.classes && d.classes.class.length) {
      plot("drill-classes", [{x: d.classes.class.map(String), y: d.classes.agreement, type: "bar", customdata: d.classes.rows,
        marker: {color: "#3b528b"}, hovertemplate: "B's class %{x}: %{y:.1%} of %{customdata} rows<extra></extra>"}],
        layout("Agreement per class of B's real prediction", "class", "agreement",
               {xaxis: {type: "category"}, yaxis: {tickformat: ".0%", range: [0, 1.02]}}));
    }
    if (d.pca && d.pca.real) {
      var traces = [
        {x: d.pca.real[0], y: d.pca.real[1], mode: "markers", type: "scatter", name: "real",
         marker: {color: "#3b528b", size: 6}},
        {x: d.pca.recon[0], y: d.pca.recon[1], mode: "markers", type: "scatter", name: "reconstructed",
         marker: {color: "#fde725", size: 6, line: {color: "#1d2330", width: 0.6}}}];
      var share = d.pca.variance_share.map(function (v) { return (100 * v).toFixed(0) + "%"; });
      plot("drill-pca", traces, layout("B's features on their first two PCs (" + d.pca.rows + " rows)",
        "PC1 (" + share[0] + ")", "PC2 (" + (share[1] || "") + ")", {}));
    }
    if (d.dim_r2 && d.dim_r2.r2.length) {
      var low = Math.min.apply(null, d.dim_r2.r2.filter(function (v) { return v !== null; }));
      plot("drill-dims", [{x: d.dim_r2.rank_fraction, y: d.dim_r2.r2, mode: "lines", type: "scatter",
        line: {color: "#21918c"}, hovertemplate: "%{x:.0%} of dims have R² ≥ %{y:.3f}<extra></extra>"}],
        layout("R² per feature dimension, sorted (" + d.dim_r2.dims + " dims" + (low < -1 ? "; axis cut at -1" : "") + ")",
               "fraction of B's dimensions", "R²", {xaxis: {tickformat: ".0%"}, yaxis: {range: [Math.max(-1, low) - 0.05, 1.05]}}));
    }
    queue.forEach(function (q) { Plotly.newPlot(q[0], q[1], q[2], config); });
    if (d.disagree && d.disagree.length) {
      panel.appendChild(el("h3", {}, "Test images where B's head disagrees (first " + d.disagree.length + ")"));
      var thumbs = el("div", {"class": "thumbs"});
      d.disagree.forEach(function (x) {
        var fig = el("figure");
        var src = (DATA.thumbs || {})[x.thumb];
        if (src) { fig.appendChild(el("img", {src: src, alt: "test row " + x.row})); }
        fig.appendChild(el("figcaption", {}, "row " + x.row + ": label " + x.label + ", B real " + x.real +
                                          ", recon " + x.recon));
        thumbs.appendChild(fig);
      });
      panel.appendChild(thumbs);
      if (d.thumb_note) { panel.appendChild(el("p", {"class": "caption"}, d.thumb_note)); }
    }
  }
  window.featrecReport.showPair = showPair;

  document.querySelectorAll(".figure.pair-heatmap").forEach(function (gd) {
    if (!gd.on) { return; }
    gd.on("plotly_click", function (e) {
      var p = e.points && e.points[0];
      if (!p || p.data.type !== "heatmap") { return; }
      showPair(DATA.order[p.y], DATA.order[p.x]);
    });
  });

  document.querySelectorAll(".figure.pair-bars").forEach(function (gd) {
    if (!gd.on) { return; }
    gd.on("plotly_click", function (e) {
      var p = e.points && e.points[0];
      if (p) { showPair(DATA.order[p.pointIndex], DATA.order[p.pointIndex]); }
    });
  });

  // ------------------------------------------------------------------ differences
  function drawDiff() {
    var gd = document.getElementById("diff-figure");
    if (!gd || !DATA.diff) { return; }
    var x = Number(document.getElementById("diff-x").value), y = Number(document.getElementById("diff-y").value);
    var metric = document.getElementById("diff-metric").value;
    var D = DATA.diff, m = D.metrics[metric], order = D.order, n = order.length, sign = 1, key = x + "|" + y;
    if (x > y) { key = y + "|" + x; sign = -1; }
    var summary = document.getElementById("diff-summary");
    if (x === y) { Plotly.purge(gd); summary.textContent = "Pick two different selections."; return; }
    var e = D.pairs[key][metric];
    function at(a, i, j) { var v = a[i][j]; return v === null ? null : sign * v; }
    var z = [], text = [], hover = [], mx = [], my = [], excl = 0, total = 0;
    for (var i = 0; i < n; i++) {
      z.push([]); text.push([]); hover.push([]);
      for (var j = 0; j < n; j++) {
        var v = at(e.d, i, j), lo = at(e.lo, i, j), hi = at(e.hi, i, j);
        if (sign < 0 && lo !== null) { var t = lo; lo = hi; hi = t; }
        z[i].push(v);
        var fmtv = v === null ? "" : fmtNum(v, m.format, true);
        text[i].push(fmtv);
        var ci = (lo === null || hi === null) ? "no interval" :
          (Math.round(100 * D.level) + "% CI " + fmtNum(lo, m.format, true) + " to " + fmtNum(hi, m.format, true) +
           ((lo > 0 || hi < 0) ? " (excludes 0)" : " (includes 0)"));
        hover[i].push([order[i], order[j], v === null ? "not in both" : m.name + " difference: " + fmtv + "<br>" + ci]);
        if (v !== null && lo !== null) {
          total += 1;
          if (lo > 0 || hi < 0) { excl += 1; mx.push(j + 0.33); my.push(i - 0.33); }
        }
      }
    }
    var flat = [].concat.apply([], z).filter(function (v) { return v !== null; }).map(Math.abs);
    var r = flat.length ? Math.max.apply(null, flat) : 1;
    var base = document.getElementById("figure-0");
    var lay = JSON.parse(JSON.stringify(base ? base.layout : {}));
    lay.title = {text: "<b>" + m.name + ": X − Y</b><br><span style='font-size:12px'>X = " + escapeHtml(D.labels[x]) +
                 "<br>Y = " + escapeHtml(D.labels[y]) + "</span>", x: 0.01, xanchor: "left", yref: "container", y: 1,
                 yanchor: "top", pad: {t: 12}};
    lay.height = Math.max(lay.height || 0, 380 + 34 * n);
    delete lay.width; lay.autosize = true;
    ["xaxis", "yaxis"].forEach(function (a) { if (lay[a]) { delete lay[a].domain; } });
    lay.margin = Object.assign({}, lay.margin || {}, {t: 96});
    lay.shapes = (base && base.layout.shapes) || [];
    var traces = [{type: "heatmap", z: z, x: order.map(function (_, k) { return k; }), y: order.map(function (_, k) { return k; }),
      text: text, texttemplate: n <= 12 ? "%{text}" : undefined, customdata: hover, colorscale: "RdBu", zmid: 0,
      zmin: -r, zmax: r, hoverongaps: false, textfont: {size: n <= 6 ? 11 : 9},
      hovertemplate: "source A: %{customdata[0]}<br>target B: %{customdata[1]}<br>%{customdata[2]}<extra></extra>",
      colorbar: {title: {text: "difference", side: "right"}, thickness: 14, tickformat: m.format.replace(".1%", ".2%")}},
      {type: "scatter", mode: "markers", x: mx, y: my, hoverinfo: "skip", showlegend: false,
       marker: {symbol: "circle", size: 6, color: "#1d2330", line: {color: "white", width: 1}}}];
    Plotly.react(gd, traces, lay, config);
    summary.textContent = excl + " of " + total + " differences exclude zero at " + Math.round(100 * D.level) +
      "% (dots); the others may be noise.";
  }
  function escapeHtml(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }
  function fmtNum(v, spec, signed) {
    var pct = spec.indexOf("%") >= 0, digits = Number((spec.match(/\.(\d+)/) || [0, 3])[1]);
    var s;
    if (pct) { s = (100 * v).toFixed(digits) + " pp"; }
    else if (spec.indexOf("g") >= 0) { s = Number(v.toPrecision(digits)).toString(); }
    else { s = v.toFixed(digits); }
    return (signed && v > 0 ? "+" : "") + s;
  }
  ["diff-x", "diff-y", "diff-metric"].forEach(function (id) {
    var s = document.getElementById(id);
    if (s) { s.addEventListener("change", drawDiff); }
  });
  drawDiff();

  // ------------------------------------------------------------------ tables
  function tableCSV(table) {
    var lines = [];
    function quote(s) { return /[",\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }
    lines.push(Array.prototype.map.call(table.tHead.rows[0].cells, function (c) { return quote(c.dataset.name); }).join(","));
    Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
      if (r.hidden) { return; }
      lines.push(Array.prototype.map.call(r.cells, function (c) { return quote(c.dataset.v); }).join(","));
    });
    return lines.join("\n") + "\n";
  }
  window.featrecReport.tableCSV = tableCSV;
  document.querySelectorAll(".table-block").forEach(function (block) {
    var table = block.querySelector("table"), filter = block.querySelector("input.filter");
    if (filter) {
      filter.addEventListener("input", function () {
        var q = filter.value.toLowerCase();
        Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
          r.hidden = q !== "" && r.textContent.toLowerCase().indexOf(q) < 0;
        });
      });
    }
    var copy = block.querySelector("button.copy");
    if (copy) {
      copy.addEventListener("click", function () {
        var csv = tableCSV(table);
        function fallback() {
          var ta = el("textarea"); ta.value = csv; document.body.appendChild(ta); ta.select();
          try { document.execCommand("copy"); } catch (err) { /* the download link still works */ }
          document.body.removeChild(ta);
        }
        if (navigator.clipboard && window.isSecureContext) { navigator.clipboard.writeText(csv).catch(fallback); }
        else { fallback(); }
        copy.textContent = "Copied";
        setTimeout(function () { copy.textContent = "Copy CSV"; }, 1500);
      });
    }
    var save = block.querySelector("a.save");
    if (save) {
      save.addEventListener("click", function () {
        save.href = URL.createObjectURL(new Blob([tableCSV(table)], {type: "text/csv"}));
      });
    }
    var pinned = Number(table.dataset.pinned || 0);
    if (pinned) {
      var left = 0, head = table.tHead.rows[0].cells;
      for (var k = 0; k < pinned && k < head.length; k++) {
        var x = left;
        table.querySelectorAll("tr > :nth-child(" + (k + 1) + ")").forEach(function (c) {
          c.classList.add("pin"); c.style.left = x + "px";
        });
        left += head[k].getBoundingClientRect().width;
      }
    }
  });
  document.querySelectorAll("table.sortable th").forEach(function (th) {
    th.addEventListener("click", function () {
      var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        if (x === "" || y === "") { return (x === "") - (y === ""); }
        var nx = Number(x), ny = Number(y);
        var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  refresh();
})();
"""
