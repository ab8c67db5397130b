// Starts ReDoc from /static (no inline script: the page's CSP forbids one).
"use strict";
(function () {
  const root = document.getElementById("redoc");
  Redoc.init(root.dataset.openapi, { hideDownloadButton: false }, root);
})();
