// Hover a word in the token strip: its column lights up in the heatmap (and back). Nothing else
// depends on this file: the page reads the same without it.
(function () {
  const strip = document.getElementById("strip");
  const heat = document.getElementById("heatmap");
  if (!strip || !heat) return;
  const toks = Array.from(strip.querySelectorAll(".tok"));
  const rows = Array.from(heat.querySelectorAll("text")).length;
  const cells = Array.from(heat.querySelectorAll("rect"));
  const perRow = rows ? cells.length / rows : 0;
  function light(i, on) {
    if (toks[i]) toks[i].classList.toggle("hl", on);
    for (let r = 0; r < rows; r++) { const c = cells[r * perRow + i]; if (c) c.classList.toggle("hl", on); }
  }
  toks.forEach((t, i) => {
    t.addEventListener("mouseenter", () => light(i, true));
    t.addEventListener("mouseleave", () => light(i, false));
  });
  cells.forEach((c, k) => {
    const i = perRow ? k % perRow : 0;
    c.addEventListener("mouseenter", () => light(i, true));
    c.addEventListener("mouseleave", () => light(i, false));
  });
})();
