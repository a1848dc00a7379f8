/* edgewise console: draws the charts a page embeds as JSON (no inline script: CSP). */
(function () {
  "use strict";

  function data(fig) {
    var el = document.getElementById(fig.getAttribute("data-src"));
    return el ? JSON.parse(el.textContent) : null;
  }

  function width(fig) {
    return Math.max(280, Math.min(fig.clientWidth || 420, 560));
  }

  function line(fig, d) {
    /* A lone window would otherwise stretch the time axis over years. */
    var lo = Math.min.apply(null, d.x), hi = Math.max.apply(null, d.x);
    var pad = hi - lo < 120 ? 120 : 0;
    return new uPlot({
      width: width(fig), height: 180, legend: { show: false },
      scales: { x: { time: true, range: [lo - pad, hi + pad] } },
      series: [{}, { label: d.name, stroke: "#2563eb", width: 1.5, spanGaps: true }],
      axes: [{}, { size: 60 }]
    }, [d.x, d.y], fig);
  }

  function edgeLabel(v) {
    return Math.abs(v) >= 100 ? v.toFixed(0) : String(Math.round(v * 100) / 100);
  }

  /* Bins are drawn by index (edges may be uneven); ticks name each bin's left edge. */
  function hist(fig, d) {
    var n = d.observed.length, xs = [], i;
    for (i = 0; i < n; i++) { xs.push(i); }
    var series = [{}, {
      label: "observed", stroke: "#2563eb", fill: "rgba(37,99,235,0.35)",
      paths: uPlot.paths.bars({ size: [0.8, 80] }), points: { show: false }
    }];
    var cols = [xs, d.observed];
    if (d.reference) {
      series.push({ label: "reference", stroke: "#dc2626", width: 2, dash: [4, 3],
                    points: { show: true, size: 4, fill: "#dc2626" } });
      cols.push(d.reference);
    }
    return new uPlot({
      width: width(fig), height: 180, legend: { show: false },
      scales: { x: { time: false, range: [-0.5, n - 0.5] } },
      series: series,
      axes: [{
        splits: function () { var s = [], step = Math.max(1, Math.ceil(n / 8)); for (var k = 0; k < n; k += step) { s.push(k); } return s; },
        values: function (u, splits) { return splits.map(function (k) { return edgeLabel(d.edges[k]); }); }
      }, { size: 50 }]
    }, cols, fig);
  }

  function draw(root) {
    if (typeof uPlot === "undefined") { return; }
    var figs = (root || document).querySelectorAll("figure[data-chart]:not([data-drawn])");
    figs.forEach(function (fig) {
      var d = data(fig);
      if (!d) { return; }
      fig.setAttribute("data-drawn", "1");
      if (fig.getAttribute("data-chart") === "hist") { hist(fig, d); } else { line(fig, d); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () { draw(document); });
  document.addEventListener("htmx:afterSwap", function (e) { draw(e.target); });
})();
