// Keyboard shortcuts: a key presses the element that names it in data-key (v violation, s safe,
// k skip, u uphold and o overturn an appeal, 1-9 a category, n the note, r show sensitive content,
// Enter start, q queues, d dashboard, a audit).
// Nothing else: the console works without this file.
document.addEventListener("keydown", function (e) {
  if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
  var typing = e.target.closest && e.target.closest("input, textarea, select");
  if (typing) {
    if (e.key === "Escape") e.target.blur();
    return;
  }
  if (e.key === "Enter" && e.target.closest && e.target.closest("a, button, summary")) return;
  var el = document.querySelector('[data-key="' + (e.key.length === 1 ? e.key.toLowerCase() : e.key) + '"]');
  if (!el) return;
  e.preventDefault();
  if (el.tagName === "TEXTAREA") el.focus();
  else if (el.tagName === "DETAILS") el.open = !el.open;
  else el.click();
});
