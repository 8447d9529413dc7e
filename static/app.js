// meshgate dashboard: the only script besides htmx. It keeps the scroll position of scrollable parts (the
// topology canvas, the details panel) while htmx replaces them with their next version every few seconds;
// htmx itself puts keyboard focus back on the element with the same id.
(function () {
  "use strict";
  var saved = {};
  document.addEventListener("htmx:beforeSwap", function () {
    saved = {};
    document.querySelectorAll("[data-keep-scroll]").forEach(function (element) {
      if (element.id) saved[element.id] = [element.scrollLeft, element.scrollTop];
    });
  });
  document.addEventListener("htmx:afterSwap", function () {
    Object.keys(saved).forEach(function (id) {
      var element = document.getElementById(id);
      if (element) {
        element.scrollLeft = saved[id][0];
        element.scrollTop = saved[id][1];
      }
    });
  });
})();
