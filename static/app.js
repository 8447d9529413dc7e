// meshgate dashboard: the only script besides htmx. It keeps the scroll position of scrollable parts (the
// topology canvas, the details panel) while htmx replaces them with their next version every few seconds
// (htmx itself puts keyboard focus back on the element with the same id); it marks the canary button of the live
// weight; and it empties a form's reason once its change went through, so the next change never reuses it.
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
  // The canary buttons: the one of the canary's live weight (shown by the live part of the page) is pressed.
  function markWeight() {
    var form = document.getElementById("canary-form");
    if (!form) return;
    var canary = form.elements.namedItem("canary");
    var shown = canary && document.getElementById("weight-value-" + canary.value);
    var weight = shown ? shown.getAttribute("data-weight") : null;
    form.querySelectorAll("button[name=percent]").forEach(function (button) {
      button.setAttribute("aria-pressed", String(button.value === weight));
    });
  }
  document.addEventListener("DOMContentLoaded", markWeight);
  document.addEventListener("htmx:afterSettle", markWeight);
  document.addEventListener("change", function (event) {
    if (event.target && event.target.id === "canary-subset") markWeight();
  });
  document.addEventListener("htmx:afterRequest", function (event) {
    var form = event.detail.elt && event.detail.elt.closest ? event.detail.elt.closest("form[data-clear-reason]") : null;
    if (form && event.detail.successful) {
      form.querySelectorAll("input[name=reason]").forEach(function (input) {
        input.value = "";
      });
    }
  });
})();
