/* CLL TME Atlas explorer: client-side helpers (served from /assets, no inline scripts). */
window.dash_clientside = Object.assign({}, window.dash_clientside, {
  tme: {
    /* "SVG" button under a figure: Plotly.downloadImage(format="svg") on its graph. */
    downloadSvg: function (nClicks, id) {
      if (!nClicks) { return window.dash_clientside.no_update; }
      var el = document.getElementById(id.index);
      var gd = el && (el.classList.contains("js-plotly-plot") ? el : el.querySelector(".js-plotly-plot"));
      if (gd && window.Plotly) {
        window.Plotly.downloadImage(gd, { format: "svg", filename: id.index });
        return "SVG saved (" + id.index + ".svg)";
      }
      return "SVG export is not available for this figure";
    }
  }
});
