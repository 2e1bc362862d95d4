// Tell require.js where the widget manager's modules live, so the URLs the bundle derives from its
// module names (its fonts) point into _static/vendor/ on every page, whatever the page's folder depth.
(function () {
  var dist = document.currentScript.src.replace(/widgets-paths\.js([?#].*)?$/, "html-manager/dist");
  var names = ["base", "base7", "controls", "controls7", "html-manager"];
  var paths = {"@jupyter-widgets/html-manager/dist": dist};
  names.forEach(function (name) { paths["@jupyter-widgets/" + name] = dist + "/" + name; });
  require.config({paths: paths});
})();
