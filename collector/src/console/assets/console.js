// Tally console: signs in with the admin token (kept in this tab's sessionStorage only), then
// fills each page from the JSON admin API with the token as the bearer token. Data is always
// written with textContent, never parsed as HTML. Navigation is htmx's (hx-boost on the nav
// and on links rendered here); this file runs the page that was swapped in.
(function () {
  "use strict";

  var TOKEN_KEY = "tally.admin_token";
  var REFRESH_MS = 5000;
  var timers = [];

  // ---- the token and the API ----------------------------------------------------------------

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function ApiError(status, body) {
    var e = (body && body.error) || {};
    this.status = status;
    this.code = e.code || "http_" + status;
    this.message = e.message || "the collector answered " + status;
  }

  // Calls the admin API; resolves with the parsed JSON, rejects with an ApiError. A 401 signs
  // the tab out (the token is wrong or was rotated).
  function api(method, path, body, tok) {
    var headers = { Authorization: "Bearer " + (tok || token() || "") };
    var init = { method: method, headers: headers, cache: "no-store", credentials: "omit" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(path, init).then(function (r) {
      return r.text().then(function (t) {
        var v = null;
        try { v = t ? JSON.parse(t) : null; } catch (_) { v = null; }
        if (r.ok) return v;
        var err = new ApiError(r.status, v);
        if (r.status === 401 && !tok) signOut("The collector refused the admin token; sign in again.");
        throw err;
      });
    });
  }

  // ---- small DOM helpers ---------------------------------------------------------------------

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  // el("td", {class: "num"}, "text", child, …)
  function el(tag, attrs) {
    var n = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) {
      if (attrs[k] === null || attrs[k] === undefined || attrs[k] === false) return;
      if (k === "text") n.textContent = attrs[k];
      else n.setAttribute(k, attrs[k] === true ? "" : attrs[k]);
    });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      n.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return n;
  }

  function row(cells) {
    var tr = el("tr");
    cells.forEach(function (c) {
      if (c && c.nodeType) tr.appendChild(c.tagName === "TD" || c.tagName === "TH" ? c : el("td", null, c));
      else tr.appendChild(el("td", null, c === null || c === undefined ? "–" : String(c)));
    });
    return tr;
  }

  function num(v) { return el("td", { class: "num" }, v === null || v === undefined ? "–" : String(v)); }

  function emptyRow(tbody, cols, text) {
    tbody.appendChild(el("tr", null, el("td", { colspan: cols, class: "muted" }, text)));
  }

  function setField(root, name, value) {
    $all('[data-field="' + name + '"]', root).forEach(function (n) {
      n.textContent = value === null || value === undefined || value === "" ? "–" : String(value);
    });
  }

  function utc(ms) {
    if (ms === null || ms === undefined) return "–";
    return new Date(ms).toISOString().replace("T", " ").slice(0, 19);
  }

  function day(s) { return new Date(s * 1000).toISOString().slice(0, 10); }

  function duration(ms) {
    if (ms === null || ms === undefined) return "–";
    var s = Math.max(0, Math.round(ms / 1000));
    if (s < 120) return s + " s";
    if (s < 7200) return Math.round(s / 60) + " min";
    if (s < 172800) return Math.round(s / 3600) + " h";
    return Math.round(s / 86400) + " d";
  }

  function signed(q) {
    var s = String(q);
    return s.charAt(0) === "-" ? "−" + s.slice(1) : "+" + s;
  }

  function link(href, text) { return el("a", { href: href }, text); }

  function customerHref(c) { return "/console/customers/" + encodeURIComponent(c); }

  function say(text) {
    var s = $("#status");
    if (s) s.textContent = text || "";
  }

  function fail(where) {
    return function (e) {
      var msg = e && e.message ? e.message : String(e);
      if (where) where.textContent = "Error: " + msg;
      else say("Error: " + msg);
    };
  }

  function newKey() {
    var b = new Uint8Array(12);
    crypto.getRandomValues(b);
    return "console-" + Array.prototype.map.call(b, function (x) { return ("0" + x.toString(16)).slice(-2); }).join("");
  }

  // Lets htmx boost links rendered after the swap.
  function processLinks(root) {
    if (window.htmx) {
      $all("a[href^='/console/']", root).forEach(function (a) {
        a.setAttribute("hx-boost", "true");
        a.setAttribute("hx-target", "#main");
        a.setAttribute("hx-swap", "innerHTML show:window:top");
      });
      window.htmx.process(root);
    }
  }

  // ---- sign-in ------------------------------------------------------------------------------

  function signedIn(yes) {
    document.body.classList.toggle("signed-in", yes);
    document.body.classList.toggle("signed-out", !yes);
    $("#signin").hidden = yes;
    $("#main").hidden = !yes;
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    stopTimers();
    signedIn(false);
    var err = $("#signin-error");
    if (message) { err.textContent = message; err.hidden = false; }
    $("#token").focus();
  }

  function onSignIn(ev) {
    ev.preventDefault();
    var input = $("#token");
    var tok = input.value.trim();
    var err = $("#signin-error");
    err.hidden = true;
    if (!tok) return;
    api("GET", "/v1/overview", undefined, tok).then(function () {
      sessionStorage.setItem(TOKEN_KEY, tok);
      input.value = "";
      signedIn(true);
      say("Signed in.");
      runPage();
    }, function (e) {
      input.value = "";
      err.textContent = e.status === 401
        ? "Wrong admin token: the collector refused it. Use the token in the admin-token file of the collector's data directory."
        : "Could not sign in: " + e.message;
      err.hidden = false;
      input.focus();
    });
  }

  // ---- pages --------------------------------------------------------------------------------

  function stopTimers() {
    timers.forEach(function (t) { clearInterval(t); });
    timers = [];
  }

  var pages = {};

  pages.overview = function (root) {
    function load() {
      return api("GET", "/v1/overview").then(function (o) {
        $all("[data-figure]", root).forEach(function (n) {
          var v = n.getAttribute("data-figure").split(".").reduce(function (a, k) {
            return a === null || a === undefined ? a : a[k];
          }, o);
          if (n.getAttribute("data-figure") === "quarantined" && o.quarantined_more) v = v + "+";
          n.textContent = v === null || v === undefined ? "–" : String(v);
        });
        setField(root, "updated", "Updated " + utc(o.at_ms) + " UTC.");
        root.setAttribute("data-loaded", "true");
      }, fail());
    }
    load();
    timers.push(setInterval(function () { if (document.body.contains(root)) load(); else stopTimers(); }, REFRESH_MS));
  };

  pages.customers = function (root) {
    var tbody = $("#customers-table tbody", root);
    var more = $("#customers-more", root);
    var after = "";
    function load(reset) {
      var prefix = $("#prefix", root).value.trim();
      if (reset) { after = ""; tbody.textContent = ""; }
      var q = "/v1/customers?limit=50&prefix=" + encodeURIComponent(prefix) + (after ? "&after=" + encodeURIComponent(after) : "");
      api("GET", q).then(function (r) {
        r.data.forEach(function (c) {
          tbody.appendChild(row([link(customerHref(c.customer), c.customer), c.stripe_customer_id || "unmapped", c.plan]));
        });
        if (!r.data.length && reset) emptyRow(tbody, 3, prefix ? "No customer key starts with “" + prefix + "”." : "No customers yet.");
        after = r.next_after || "";
        more.hidden = !r.has_more;
        processLinks(tbody);
        root.setAttribute("data-loaded", "true");
      }, fail());
    }
    var t = null;
    $("#prefix", root).addEventListener("input", function () { clearTimeout(t); t = setTimeout(function () { load(true); }, 250); });
    $("#customer-search", root).addEventListener("submit", function (ev) { ev.preventDefault(); load(true); });
    more.addEventListener("click", function () { load(false); });
    load(true);
  };

  pages.customer = function (root) {
    var c = root.getAttribute("data-customer");
    var enc = encodeURIComponent(c);
    api("GET", "/v1/customers/" + enc).then(function (r) {
      setField(root, "stripe_customer_id", r.stripe_customer_id || "unmapped (usage waits in the outbox)");
      setField(root, "plan", r.plan || "none");
    }, function (e) {
      if (e.status === 404) { setField(root, "stripe_customer_id", "unmapped"); setField(root, "plan", "none"); }
      else fail()(e);
    });
    var meters = [];
    var usageBody = $("#usage-table tbody", root);
    function loadUsage() {
      return api("GET", "/v1/customers/" + enc + "/usage").then(function (r) {
        usageBody.textContent = "";
        var current = new Date().toISOString().slice(0, 7);
        r.data.sort(function (a, b) { return a.meter < b.meter ? -1 : a.meter > b.meter ? 1 : a.period < b.period ? 1 : -1; });
        r.data.forEach(function (u) {
          var p = u.period === current ? u.period + " (current)" : u.period;
          var tr = row([u.meter, p, num(u.quantity), num(u.events)]);
          tr.setAttribute("data-meter", u.meter);
          tr.setAttribute("data-period", u.period);
          usageBody.appendChild(tr);
        });
        if (!r.data.length) emptyRow(usageBody, 4, "No usage recorded.");
      }, fail());
    }
    var entriesBody = $("#entries-table tbody", root);
    var moreEntries = $("#entries-more", root);
    var after = 0;
    function source(s) {
      if (s.type === "batch_row") return "agent " + s.agent.slice(0, 8) + "… epoch " + s.epoch + " seq " + s.seq + " row " + s.row;
      if (s.type === "adjustment") return "adjustment “" + s.reason + "” (key " + s.idempotency_key + ")";
      return s.type;
    }
    function loadEntries(reset) {
      if (reset) { after = 0; entriesBody.textContent = ""; }
      return api("GET", "/v1/ledger/entries?limit=50&customer=" + enc + "&after=" + after).then(function (r) {
        r.data.forEach(function (e) {
          var tr = row([num(e.position), utc(e.posted_at_ms), e.unit, num(signed(e.quantity)), num(e.events), source(e.source)]);
          tr.setAttribute("data-source", e.source.type);
          entriesBody.appendChild(tr);
        });
        if (reset && !r.data.length) emptyRow(entriesBody, 6, "No ledger entries.");
        if (r.next_after) after = r.next_after;
        moreEntries.hidden = !r.has_more;
      }, fail());
    }
    moreEntries.addEventListener("click", function () { loadEntries(false); });

    var chart = null;
    function loadChart() {
      var m = $("#chart-meter", root).value;
      var g = $("#chart-granularity", root).value;
      var box = $("#chart", root);
      if (!m) { box.textContent = "No meters."; return; }
      api("GET", "/v1/usage/series?customer=" + enc + "&meter=" + encodeURIComponent(m) + "&granularity=" + g).then(function (s) {
        var xs = s.data.map(function (p) { return p.start_ms / 1000; });
        var ys = s.data.map(function (p) { return Number(p.quantity); }); // drawing only: totals stay decimal strings
        $("#chart-summary", root).textContent = "Total " + s.total + " " + m + " from " + utc(s.from_ms) + " to " + utc(s.to_ms) + " UTC, in " + s.granularity + " buckets" + (s.truncated ? " (older transfers not read: scan limit)" : "") + ".";
        box.setAttribute("data-total", s.total);
        if (chart) { chart.destroy(); chart = null; }
        box.textContent = "";
        if (!window.uPlot) { box.textContent = "Chart library not loaded."; return; }
        var width = Math.max(260, (box.clientWidth || 600) - 16);
        chart = new window.uPlot({
          width: width, height: 220,
          scales: { x: { time: true } },
          axes: [{}, { size: 60 }],
          legend: { show: true },
          series: [{ label: "time (UTC)" }, { label: m, stroke: "#1f4e8c", width: 2, fill: "rgba(31,78,140,0.12)", paths: window.uPlot.paths && window.uPlot.paths.stepped ? window.uPlot.paths.stepped({ align: 1 }) : undefined }],
          tzDate: function (ts) { return window.uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); }
        }, [xs, ys], box);
        var c = chart;
        var onResize = function () {
          if (chart !== c || !document.body.contains(box)) { window.removeEventListener("resize", onResize); return; }
          c.setSize({ width: Math.max(260, box.clientWidth - 16), height: 220 });
        };
        window.addEventListener("resize", onResize);
      }, fail($("#chart-summary", root)));
    }
    $("#chart-meter", root).addEventListener("change", loadChart);
    $("#chart-granularity", root).addEventListener("change", loadChart);

    var ent = $("#entitlements", root);
    function loadEntitlements() {
      return api("GET", "/v1/entitlements/" + enc).then(function (r) {
        ent.textContent = "";
        ent.appendChild(el("p", null, "Plan: ", el("strong", null, r.plan || "no plan")));
        var feats = Object.keys(r.features || {});
        ent.appendChild(el("p", null, "Features: " + (feats.length
          ? feats.map(function (f) { return f + " (" + (r.features[f].allowed ? "allowed" : "denied") + ", " + r.features[f].source + ")"; }).join(", ")
          : "none")));
        var ms = Object.keys(r.meters || {});
        if (ms.length) {
          var t = el("table", { id: "limits-table" },
            el("thead", null, row(["Meter", "Enforcement", "Included", "Granted", "Used", "Leased", "Remaining", "Period (UTC)", "Allowed"]).cloneNode(true)));
          var tb = el("tbody");
          ms.forEach(function (m) {
            var x = r.meters[m];
            tb.appendChild(row([m, x.enforcement, num(x.included), num(x.granted), num(x.used), num(x.leased), num(x.remaining),
              utc(x.period.start * 1000).slice(0, 10) + " to " + utc(x.period.end * 1000).slice(0, 10), x.allowed ? "yes" : "no"]));
          });
          t.appendChild(tb);
          ent.appendChild(t);
        } else {
          ent.appendChild(el("p", { class: "muted" }, "No metered limits."));
        }
        ent.setAttribute("data-state", "loaded");
      }, function (e) {
        ent.textContent = "";
        ent.appendChild(el("p", { class: "muted", "data-state": "unavailable" },
          e.status === 404 ? "Entitlements: not available on this collector." : "Entitlements: not available (" + e.message + ")."));
      });
    }
    loadEntitlements();

    var gform = $("#grant-form", root);
    $("#grant-key", root).value = newKey();
    gform.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var out = $("#grant-result", root);
      var body = {
        customer: c,
        meter: gform.meter.value,
        quantity: gform.quantity.value.trim(),
        priority: parseInt(gform.priority.value || "0", 10),
        idempotency_key: gform.idempotency_key.value.trim()
      };
      var days = gform.expires_days.value.trim();
      if (days) body.expires_at = Math.floor(Date.now() / 1000) + parseInt(days, 10) * 86400;
      out.textContent = "Granting…";
      api("POST", "/v1/grants", body).then(function (g) {
        out.textContent = "Granted: " + g.quantity + " " + g.meter + (g.expires_at ? ", until " + utc(g.expires_at * 1000) : "") + ".";
        out.setAttribute("data-outcome", "created");
        gform.quantity.value = ""; gform.idempotency_key.value = newKey();
        loadEntitlements(); loadEntries(true);
      }, function (e) {
        out.textContent = "Refused: " + e.message;
        out.setAttribute("data-outcome", "error");
      });
    });

    var form = $("#adjust-form", root);
    $("#adj-key", root).value = newKey();
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var out = $("#adjust-result", root);
      var body = {
        customer: c,
        meter: form.meter.value,
        quantity: form.quantity.value.trim().replace("−", "-"),
        reason: form.reason.value.trim(),
        idempotency_key: form.idempotency_key.value.trim()
      };
      if (form.period.value.trim()) body.period = form.period.value.trim();
      out.textContent = "Posting…";
      api("POST", "/v1/adjustments", body).then(function (a) {
        out.textContent = a.created
          ? "Posted: " + signed(a.quantity) + " " + a.meter + " in " + a.period + " (transfer " + a.id.slice(0, 12) + "…)."
          : "Already posted earlier with this idempotency key: nothing changed.";
        out.setAttribute("data-outcome", a.created ? "created" : "exists");
        if (a.created) { form.quantity.value = ""; form.reason.value = ""; form.idempotency_key.value = newKey(); }
        loadUsage(); loadEntries(true); loadChart();
      }, function (e) {
        out.textContent = "Refused: " + e.message;
        out.setAttribute("data-outcome", "error");
      });
    });

    api("GET", "/v1/meters").then(function (r) {
      meters = r.data.map(function (m) { return m.name; });
      [$("#chart-meter", root), $("#adj-meter", root), $("#grant-meter", root)].forEach(function (sel) {
        sel.textContent = "";
        meters.forEach(function (m) { sel.appendChild(el("option", { value: m }, m)); });
      });
      loadChart();
    }, fail());
    Promise.all([loadUsage(), loadEntries(true)]).then(function () { root.setAttribute("data-loaded", "true"); });
  };

  pages.meters = function (root) {
    var tbody = $("#meters-table tbody", root);
    var form = $("#meter-form", root);
    function fill(m) {
      form.name.value = m.name;
      form.aggregation.value = m.aggregation;
      form.event_type.value = m.event_type;
      form.value_property.value = m.value_property || "";
      form.group_by.value = Object.keys(m.group_by || {}).map(function (k) { return k + "=" + m.group_by[k]; }).join("\n");
      form.stripe_event_name.value = m.stripe_event_name || "";
      form.stripe_unit_scale.value = m.stripe_unit_scale || "1";
      form.name.focus();
    }
    function load() {
      return api("GET", "/v1/meters").then(function (r) {
        setField(root, "version", r.version);
        tbody.textContent = "";
        r.data.forEach(function (m) {
          var edit = el("button", { type: "button", class: "quiet", "aria-label": "Edit meter " + m.name }, "Edit");
          edit.addEventListener("click", function () { fill(m); });
          var gb = Object.keys(m.group_by || {}).map(function (k) { return k + "=" + m.group_by[k]; }).join(", ");
          tbody.appendChild(row([m.name, m.aggregation, m.event_type, m.value_property, gb || "–", m.stripe_event_name || "not forwarded", num(m.stripe_unit_scale), el("td", null, edit)]));
        });
        if (!r.data.length) emptyRow(tbody, 8, "No meters yet.");
        root.setAttribute("data-loaded", "true");
      }, fail());
    }
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var out = $("#meter-result", root);
      var gb = {};
      form.group_by.value.split("\n").forEach(function (l) {
        var i = l.indexOf("=");
        if (i > 0) gb[l.slice(0, i).trim()] = l.slice(i + 1).trim();
      });
      var body = {
        aggregation: form.aggregation.value,
        event_type: form.event_type.value.trim(),
        value_property: form.value_property.value.trim() || null,
        group_by: gb,
        stripe_event_name: form.stripe_event_name.value.trim() || null,
        stripe_unit_scale: form.stripe_unit_scale.value.trim() || "1"
      };
      api("PUT", "/v1/meters/" + encodeURIComponent(form.name.value.trim()), body).then(function (r) {
        out.textContent = "Saved; catalog version " + r.version + ".";
        load();
      }, function (e) { out.textContent = "Refused: " + e.message; });
    });
    load();
  };

  pages.agents = function (root) {
    var tbody = $("#agents-table tbody", root);
    var dialog = $("#revoke-dialog", root);
    var pending = null;
    dialog.addEventListener("close", function () {
      if (dialog.returnValue !== "revoke" || !pending) return;
      var id = pending;
      pending = null;
      api("POST", "/v1/agents/" + id + "/revoke").then(function () {
        say("Agent " + id + " revoked.");
        load();
      }, fail());
    });
    function load() {
      return api("GET", "/v1/agents").then(function (r) {
        tbody.textContent = "";
        r.data.forEach(function (a) {
          var state = a.revoked_at_ms ? "revoked " + utc(a.revoked_at_ms) : a.connected ? "connected" : "offline";
          var backlog = a.highest_seq === null ? null : a.highest_seq - a.acked_seq - a.pending_above_watermark;
          var action = null;
          if (!a.revoked_at_ms) {
            action = el("button", { type: "button", class: "danger", "aria-label": "Revoke agent " + a.id, "data-agent": a.id }, "Revoke…");
            action.addEventListener("click", function () {
              pending = a.id;
              setField(dialog, "agent", a.id);
              dialog.returnValue = "";
              dialog.showModal();
            });
          }
          var tr = row([el("td", null, el("code", null, a.id)), state, utc(a.last_seen_ms), num(duration(a.lag_ms)), num(a.epoch), num(a.acked_seq), num(backlog), el("td", null, action)]);
          tr.setAttribute("data-agent", a.id);
          tr.setAttribute("data-state", a.revoked_at_ms ? "revoked" : a.connected ? "connected" : "offline");
          tbody.appendChild(tr);
        });
        if (!r.data.length) emptyRow(tbody, 8, "No agents have enrolled.");
        root.setAttribute("data-loaded", "true");
      }, fail());
    }
    load();
  };

  pages.stripe = function (root) {
    var deadBody = $("#dead-table tbody", root);
    function load() {
      return api("GET", "/v1/stripe/outbox?state=dead&limit=100").then(function (r) {
        setField(root, "mode", r.mode === "send" ? "sending to Stripe" : "log only (no API key)");
        $("[data-field=last_error]", root).textContent = r.last_error ? "Last error: " + r.last_error : "";
        ["pending_rows", "unknown_rows", "sent_rows", "dead_rows"].forEach(function (k) { setField(root, k, r.stats[k]); });
        var um = $("#unmapped-list", root);
        um.textContent = "";
        var keys = Object.keys(r.unmapped || {});
        if (!keys.length) um.appendChild(el("p", { class: "muted" }, "None."));
        else {
          var ul = el("ul");
          keys.forEach(function (k) { ul.appendChild(el("li", null, link(customerHref(k), k), ": " + r.unmapped[k] + " rows")); });
          um.appendChild(ul);
          processLinks(um);
        }
        deadBody.textContent = "";
        r.data.forEach(function (d) {
          var btn = el("button", { type: "button", "aria-label": "Retry row " + d.row.id, "data-retry": d.row.id }, "Retry");
          btn.addEventListener("click", function () {
            btn.disabled = true;
            api("POST", "/v1/stripe/outbox/" + d.row.id + "/retry").then(function () {
              $("#retry-result", root).textContent = "Row " + d.row.id + " requeued: the forwarder sends it again.";
              load();
            }, function (e) { btn.disabled = false; $("#retry-result", root).textContent = "Refused: " + e.message; });
          });
          var err = d.error ? d.error.status + " " + d.error.code + ": " + d.error.message : "–";
          var tr = row([num(d.row.id), link(customerHref(d.row.customer), d.row.customer), d.row.meter, num(d.row.value), utc(d.row.timestamp_s * 1000), err, el("td", null, btn)]);
          tr.setAttribute("data-row", d.row.id);
          deadBody.appendChild(tr);
        });
        if (!r.data.length) emptyRow(deadBody, 7, "No dead letters.");
        processLinks(deadBody);
        root.setAttribute("data-loaded", "true");
      }, fail());
    }
    var recBody = $("#reconciliation-table tbody", root);
    api("GET", "/v1/reconciliation?days=7").then(function (r) {
      recBody.textContent = "";
      setField(root, "reconciliation_note", r.mode === "log_only"
        ? "No Stripe API key: nothing was compared."
        : r.compared + " customer·meter·day keys compared" + (r.skipped.length ? "; skipped: " + r.skipped.join(", ") : "") + ".");
      for (var d = r.from_day; d < r.to_day; d += 86400) {
        var ds = r.discrepancies.filter(function (x) { return x.key.day_start_s === d; });
        if (!ds.length) recBody.appendChild(row([day(d), el("td", { colspan: 5, class: "muted" }, "no discrepancy")]));
        ds.forEach(function (x) {
          recBody.appendChild(row([day(d), x.key.stripe_customer, x.key.event_name, num(x.ledger), num(x.stripe), num(signed(x.difference))]));
        });
      }
    }, fail($("[data-field=reconciliation_note]", root)));
    load();
  };

  pages.quarantine = function (root) {
    var tbody = $("#quarantine-table tbody", root);
    var more = $("#quarantine-more", root);
    var after = 0;
    function load() {
      return api("GET", "/v1/quarantine?limit=100&after=" + after).then(function (r) {
        r.data.forEach(function (q) {
          tbody.appendChild(row([num(q.id), utc(q.received_at_ms), el("td", null, el("code", null, q.agent)), num(q.epoch), num(q.seq), q.code + (q.row === null ? "" : " (row " + q.row + ")"), q.message]));
          after = q.id;
        });
        if (!tbody.children.length) emptyRow(tbody, 7, "Nothing is quarantined.");
        more.hidden = r.data.length < 100;
        root.setAttribute("data-loaded", "true");
      }, fail());
    }
    more.addEventListener("click", load);
    load();
  };

  function runPage() {
    stopTimers();
    say("");
    if (!token()) { signedIn(false); return; }
    signedIn(true);
    var root = $("#main [data-page]");
    if (!root) return;
    var name = root.getAttribute("data-page");
    $all("nav a").forEach(function (a) {
      var slug = a.getAttribute("href").split("/")[2];
      var cur = name === slug || (name === "customer" && slug === "customers");
      if (cur) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    });
    if (pages[name]) pages[name](root);
  }

  document.addEventListener("DOMContentLoaded", function () {
    $("#signin-form").addEventListener("submit", onSignIn);
    $("#signout").addEventListener("click", function () { signOut("Signed out."); });
    document.body.addEventListener("htmx:afterSettle", function (ev) {
      if (ev.detail && ev.detail.target && ev.detail.target.id === "main") {
        runPage();
        $("#main").focus({ preventScroll: true });
      }
    });
    runPage();
    if (!token()) $("#token").focus();
  });
})();
