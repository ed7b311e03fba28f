// Sort the latent table by the column the URL's #sort=COLUMN[,asc] names; a header click sets it (again: reverse).
(function () {
  var table = document.getElementById("latents");
  var heads = table.tHead.rows[0].cells;
  function value(row, key, type) {
    var raw = row.cells[key].getAttribute("data-value");
    if (type === "number") { return raw === "" ? -Infinity : parseFloat(raw); }
    return raw;
  }
  function sort() {
    var match = /sort=(\d+)(,asc)?/.exec(window.location.hash);
    if (!match) { return; }
    var key = parseInt(match[1], 10), ascending = Boolean(match[2]);
    var type = heads[key].getAttribute("data-type");
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    rows.sort(function (a, b) {
      var x = value(a, key, type), y = value(b, key, type);
      var order = x < y ? -1 : x > y ? 1 : 0;
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { table.tBodies[0].appendChild(row); });
    for (var i = 0; i < heads.length; i++) { heads[i].className = ""; }
    heads[key].className = ascending ? "sorted-asc" : "sorted-desc";
  }
  for (var i = 0; i < heads.length; i++) {
    heads[i].querySelector("a").addEventListener("click", function (event) {
      event.preventDefault();
      var key = this.parentNode.getAttribute("data-key");
      var now = /sort=(\d+)(,asc)?/.exec(window.location.hash);
      var again = now && now[1] === key && !now[2];
      window.location.hash = "sort=" + key + (again ? ",asc" : "");
    });
  }
  window.addEventListener("hashchange", sort);
  sort();
})();
