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
    return new uPlot({
      width: width(fig), height: 180, legend: { show: false },
      series: [{}, { label: d.name, stroke: "#2563eb", width: 1.5, spanGaps: true }],
      axes: [{}, { size: 60 }]
    }, [d.x, d.y], fig);
  }

  function hist(fig, d) {
    var xs = [], i;
    for (i = 0; i + 1 < d.edges.length; i++) { xs.push((d.edges[i] + d.edges[i + 1]) / 2); }
    var series = [{}, {
      label: "observed", stroke: "#2563eb", fill: "rgba(37,99,235,0.35)",
      paths: uPlot.paths.bars({ size: [0.9, 60] }), points: { show: false }
    }];
    var cols = [xs, d.observed];
    if (d.reference) {
      series.push({ label: "reference", stroke: "#dc2626", width: 2,
                    paths: uPlot.paths.stepped({ align: 0 }), points: { show: false } });
      cols.push(d.reference);
    }
    return new uPlot({
      width: width(fig), height: 180, scales: { x: { time: false } },
      series: series, axes: [{}, { size: 50 }]
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
