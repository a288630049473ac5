// The slice viewer of the study page: a slider, buttons, arrow keys and the wheel move
// through the slices; two check boxes toggle the lung and lesion overlays.  The images come
// from the server (the study's stored view), one PNG per slice.
(function () {
  "use strict";
  var root = document.getElementById("viewer");
  if (!root) { return; }
  var base = root.getAttribute("data-base");
  var n = parseInt(root.getAttribute("data-n"), 10);
  var img = document.getElementById("slice");
  var slider = document.getElementById("slider");
  var label = document.getElementById("slice-label");
  var lungs = document.getElementById("ov-lungs");
  var lesions = document.getElementById("ov-lesions");
  var k = parseInt(root.getAttribute("data-start") || "0", 10);

  function show(next) {
    k = Math.max(0, Math.min(n - 1, next));
    var overlays = [];
    if (lungs.checked) { overlays.push("lungs"); }
    if (lesions.checked) { overlays.push("lesions"); }
    img.src = base + "/slice/" + k + ".png?overlays=" + overlays.join(",");
    slider.value = String(k);
    label.textContent = (k + 1) + " / " + n;
  }
  slider.addEventListener("input", function () { show(parseInt(slider.value, 10)); });
  document.getElementById("prev").addEventListener("click", function () { show(k - 1); });
  document.getElementById("next").addEventListener("click", function () { show(k + 1); });
  lungs.addEventListener("change", function () { show(k); });
  lesions.addEventListener("change", function () { show(k); });
  img.addEventListener("wheel", function (e) {
    e.preventDefault();
    show(k + (e.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  document.addEventListener("keydown", function (e) {
    var t = e.target && e.target.tagName;
    if (t === "INPUT" || t === "TEXTAREA" || t === "SELECT") { return; }
    if (e.key === "ArrowUp" || e.key === "ArrowLeft") { show(k - 1); e.preventDefault(); }
    if (e.key === "ArrowDown" || e.key === "ArrowRight") { show(k + 1); e.preventDefault(); }
  });
  Array.prototype.forEach.call(document.querySelectorAll("button.goto"), function (b) {
    b.addEventListener("click", function () {
      show(parseInt(b.getAttribute("data-slice"), 10));
      root.scrollIntoView();
    });
  });
})();
