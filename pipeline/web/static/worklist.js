// The worklist refreshes itself while a batch runs: it polls the list's stamp (which changes
// whenever a study is recorded) and reloads when it changed.  The reload carries auto=1, so
// an unattended screen does not keep its session alive.
(function () {
  "use strict";
  var body = document.body;
  var stamp = body.getAttribute("data-stamp");
  var every = parseInt(body.getAttribute("data-refresh-s") || "0", 10);
  if (!stamp || !every || every < 1) { return; }
  function check() {
    fetch("/worklist/stamp", { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (now) {
        if (now !== null && now !== stamp) {
          var url = new URL(window.location.href);
          url.searchParams.set("auto", "1");
          window.location.replace(url.toString());
        }
      })
      .catch(function () { /* the server is away: try again next time */ });
  }
  window.setInterval(check, every * 1000);
})();
