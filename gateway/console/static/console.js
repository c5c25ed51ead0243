// The console's own script. Pages work without it (forms post and redirect); with it, they follow the
// log live (EventSource on the SSE feeds, signed in by the session cookie) and actions answer in place.
(() => {
  "use strict";

  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
  const liveStatus = document.getElementById("live-status");

  let sayTimer = null;
  function say(text, { sticky = false } = {}) {
    if (!liveStatus) return;
    clearTimeout(sayTimer);
    liveStatus.textContent = text;
    liveStatus.hidden = !text;
    if (text && !sticky) sayTimer = setTimeout(() => { liveStatus.hidden = true; }, 5000);
  }

  function signInAgain() {
    location.href = "/console?next=" + encodeURIComponent(location.pathname + location.search);
  }

  // The HTML of a fragment URL; null when the server says the thing is gone (204).
  async function fetchHtml(url) {
    const response = await fetch(url, { headers: { Accept: "text/html" }, credentials: "same-origin" });
    if (response.status === 401) { signInAgain(); return null; }
    if (response.status === 204 || response.status === 404) return null;
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    return response.text();
  }

  function element(html) {
    const template = document.createElement("template");
    template.innerHTML = html.trim();
    return template.content.firstElementChild;
  }

  // Someone typing or with focus inside must not lose it to a refresh: wait until they leave.
  function busy(node) {
    if (node.contains(document.activeElement) && document.activeElement !== document.body) return true;
    return [...node.querySelectorAll("textarea, input[type=text], input:not([type])")].some((f) => f.value !== "");
  }

  const deferred = new WeakMap();
  function whenIdle(node, refresh) {
    if (!busy(node)) return refresh();
    const waiting = deferred.has(node);
    deferred.set(node, refresh);  // only the newest refresh matters
    if (waiting) return;
    node.dataset.stale = "true";
    node.addEventListener("focusout", function retry() {
      setTimeout(() => {
        if (busy(node)) return;
        node.removeEventListener("focusout", retry);
        delete node.dataset.stale;
        const latest = deferred.get(node);
        deferred.delete(node);
        latest?.();
      }, 0);
    });
  }

  // One EventSource per live container. It reconnects by itself and resumes after the last id it saw.
  function follow(container, onEvent) {
    const types = (container.dataset.types || "").split(",").filter(Boolean);
    const source = new EventSource(container.dataset.feed, { withCredentials: true });
    source.onopen = () => say("");
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) say("Live updates stopped; reload the page.", { sticky: true });
      else say("Reconnecting to live updates…", { sticky: true });
    };
    for (const type of types) {
      source.addEventListener(type, (message) => {
        let data;
        try { data = JSON.parse(message.data); } catch { return; }
        onEvent(type, data);
      });
    }
    window.addEventListener("pagehide", () => source.close());
    return source;
  }

  function countRows(testid) {
    const rows = document.querySelectorAll(`[data-testid="${testid}"]`).length;
    for (const counter of document.querySelectorAll(`[data-count="${testid}"]`)) counter.textContent = String(rows);
    for (const empty of document.querySelectorAll('[data-testid$="-empty"]')) empty.hidden = rows > 0;
  }

  // Rows mode: each event names a row (by approval or task id); the row is fetched fresh and
  // inserted, replaced, or removed when the server answers that it no longer belongs.
  function liveRows(container) {
    const rowKey = container.dataset.rowKey;
    const testid = container.dataset.rowTestid;
    const insertOn = (container.dataset.insertOn || "").split(",").filter(Boolean);
    const insertAllowed = container.dataset.insert !== "none";
    const queued = new Map();
    const idAttribute = rowKey === "approval_id" ? "data-approval-id" : "data-task-id";

    const rowOf = (id) => container.querySelector(`[data-testid="${testid}"][${idAttribute}="${CSS.escape(id)}"]`);

    function sortKey(node) {
      return [node.dataset.mayDecide === "false" ? 1 : 0, node.dataset.created || ""];
    }

    function place(node) {
      if (container.dataset.insert === "top") {
        container.prepend(node);
        return;
      }
      const [mine, created] = sortKey(node);
      for (const other of container.querySelectorAll(`[data-testid="${testid}"]`)) {
        const [otherMine, otherCreated] = sortKey(other);
        if (mine < otherMine || (mine === otherMine && created < otherCreated)) {
          other.before(node);
          return;
        }
      }
      container.append(node);
    }

    async function refresh(id, mayInsert) {
      if (!mayInsert && !rowOf(id)) return;  // an event of something this page does not show
      const url = container.dataset.rowUrl.replace("{id}", encodeURIComponent(id));
      let html;
      try { html = await fetchHtml(url); } catch (error) { say(`Could not refresh ${id}: ${error.message}`); return; }
      const existing = rowOf(id);
      if (html === null) {
        existing?.remove();
      } else if (existing) {
        whenIdle(existing, () => { const current = rowOf(id); current?.replaceWith(element(html)); countRows(testid); });
      } else if (mayInsert) {
        place(element(html));
      }
      countRows(testid);
    }

    // Events for one row coalesce: one fetch at a time per row, and one more if anything came meanwhile.
    function schedule(id, mayInsert) {
      const entry = queued.get(id);
      if (entry) { entry.again = true; entry.mayInsert ||= mayInsert; return; }
      const state = { again: false, mayInsert };
      queued.set(id, state);
      (async () => {
        do {
          state.again = false;
          await refresh(id, state.mayInsert);
        } while (state.again);
        queued.delete(id);
      })();
    }

    container._refreshRow = (id) => schedule(id, false);

    follow(container, (type, data) => {
      if (rowKey === "aggregate_id" && data.aggregate !== "task") return;
      const id = data[rowKey];
      if (id) {
        schedule(id, insertAllowed && (insertOn.length === 0 || insertOn.includes(type)));
        return;
      }
      // A task event that names no approval (cancelled, timed out…): its rows may have to leave.
      for (const row of container.querySelectorAll(`[data-task-id="${CSS.escape(data.aggregate_id || "")}"]`)) {
        schedule(row.dataset.approvalId, false);
      }
    });
  }

  // Region mode: any event re-renders the region from the server (debounced). Where the region marks
  // parts (data-region), each part is swapped on its own and the rest of the region is left alone.
  function swapRegion(container, html) {
    const fresh = document.createElement("template");
    fresh.innerHTML = html;
    const parts = fresh.content.querySelectorAll("[data-region]");
    if (parts.length === 0) {
      whenIdle(container, () => { container.innerHTML = html; });
      return;
    }
    for (const part of parts) {
      const current = container.querySelector(`[data-region="${CSS.escape(part.dataset.region)}"]`);
      if (current) whenIdle(current, () => { container.querySelector(`[data-region="${CSS.escape(part.dataset.region)}"]`)?.replaceWith(part); });
    }
  }

  function liveRegion(container) {
    let timer = null;
    let running = false;
    let again = false;

    async function refresh() {
      if (running) { again = true; return; }
      running = true;
      try {
        do {
          again = false;
          const html = await fetchHtml(container.dataset.regionUrl);
          if (html !== null) swapRegion(container, html);
        } while (again);
      } catch (error) {
        say(`Could not refresh: ${error.message}`);
      } finally {
        running = false;
      }
    }

    container._refresh = refresh;
    follow(container, () => {
      clearTimeout(timer);
      timer = setTimeout(refresh, 100);
    });
  }

  async function post(form, url) {
    const response = await fetch(url, {
      method: "POST",
      body: new URLSearchParams(new FormData(form)),
      headers: { Accept: "application/json", "X-CSRF-Token": csrf },
      credentials: "same-origin",
    });
    if (response.status === 401) { signInAgain(); return null; }
    let data = {};
    try { data = await response.json(); } catch { /* an empty or non-JSON answer */ }
    if (!response.ok) throw new Error(data.detail || `${response.status} ${response.statusText}`);
    return data;
  }

  async function showStateAt(form, seq) {
    const target = document.getElementById("state-at-result");
    const input = form.querySelector('input[name="at"]');
    input.value = String(seq);
    try {
      const html = await fetchHtml(`${form.dataset.url}?at=${encodeURIComponent(seq)}`);
      target.innerHTML = html ?? "";
      history.replaceState(null, "", `?at=${encodeURIComponent(seq)}#state-at-section`);
    } catch (error) {
      target.innerHTML = "";
      const message = document.createElement("p");
      message.className = "error";
      message.textContent = `Could not show sequence ${seq}: ${error.message}`;
      target.append(message);
    }
  }

  document.addEventListener("submit", async (event) => {
    const form = event.target;
    const kind = form.dataset.action;
    if (!kind) return;
    event.preventDefault();
    if (kind === "state-at") {
      const seq = form.querySelector('input[name="at"]').value;
      if (seq !== "") await showStateAt(form, seq);
      return;
    }
    const url = event.submitter?.getAttribute("formaction") || form.getAttribute("action");
    const error = form.querySelector('[data-testid="action-error"]') || form.parentElement.querySelector('[data-testid="action-error"]');
    const buttons = form.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    if (error) error.hidden = true;
    try {
      const data = await post(form, url);
      if (data === null) return;
      say(data.message || "Done");
      if (kind === "decide") {
        const row = form.closest("[data-approval-id]");
        const container = row?.closest('[data-live="rows"]');
        form.reset();
        document.activeElement?.blur();
        if (row && container?._refreshRow) container._refreshRow(row.dataset.approvalId);
      } else {
        form.reset();
        document.activeElement?.blur();
        form.closest('[data-live="region"]')?._refresh?.();
      }
    } catch (failure) {
      if (error) { error.textContent = failure.message; error.hidden = false; } else say(failure.message);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  });

  document.addEventListener("click", (event) => {
    const link = event.target.closest("[data-state-at]");
    const form = document.querySelector('form[data-action="state-at"]');
    if (!link || !form) return;
    event.preventDefault();
    showStateAt(form, link.dataset.stateAt);
    document.getElementById("state-at-section")?.scrollIntoView({ behavior: "smooth", block: "nearest" });
  });

  document.addEventListener("change", (event) => {
    const form = event.target.closest('form[data-action="state-at"]');
    if (form && event.target.value !== "") showStateAt(form, event.target.value);
  });

  for (const container of document.querySelectorAll('[data-live="rows"]')) liveRows(container);
  for (const container of document.querySelectorAll('[data-live="region"]')) liveRegion(container);
})();
