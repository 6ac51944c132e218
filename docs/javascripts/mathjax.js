// MathJax settings for pymdownx.arithmatex's generic mode: math sits in
// <span class="arithmatex">\( ... \)</span> and <div class="arithmatex">\[ ... \]</div>.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" },
};
// Material's instant navigation swaps pages without a reload: typeset each new page.
if (typeof document$ !== "undefined") {
  document$.subscribe(() => { if (window.MathJax.typesetPromise) window.MathJax.typesetPromise(); });
}
