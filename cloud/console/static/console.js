// Open-AutoGLM console: live regions, confirmations, the rollout form's device count.
// No framework and nothing fetched from elsewhere; the pages work without it (only not live).
"use strict";

(function () {
  const body = document.body;
  const refreshMs = Number(body.dataset.refreshMs || 2000);

  // Refresh every [data-live] region from the same URL, in place. A region holding the focus
  // (someone is typing or has a menu open) waits for the next round.
  let inFlight = false;
  async function refresh() {
    const regions = document.querySelectorAll("[data-live][id]");
    if (!regions.length || inFlight || document.hidden) return;
    inFlight = true;
    try {
      const r = await fetch(location.href, { headers: { "X-Console-Live": "1" }, credentials: "same-origin" });
      if (r.redirected && new URL(r.url).pathname === "/ui/login") { location.href = r.url; return; }
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      for (const region of regions) {
        if (region.contains(document.activeElement) && document.activeElement !== document.body) continue;
        const fresh = doc.getElementById(region.id);
        if (fresh && fresh.innerHTML !== region.innerHTML) {
          region.innerHTML = fresh.innerHTML;
          region.dispatchEvent(new CustomEvent("console:refreshed", { bubbles: true }));
        }
      }
      body.dataset.refreshedAt = String(Date.now());
    } catch (e) {
      // Network hiccup: the next round tries again.
    } finally {
      inFlight = false;
    }
  }
  setInterval(refresh, refreshMs);

  // Confirm destructive actions: a button (or form) with data-confirm asks first.
  document.addEventListener("submit", (ev) => {
    const button = ev.submitter;
    const text = (button && button.dataset.confirm) || ev.target.dataset.confirm;
    if (text && !window.confirm(text)) ev.preventDefault();
  });

  // The rollout form: how many devices the selector matches, as the operator types.
  const selector = document.querySelector("[data-match-count]");
  if (selector) {
    const out = document.getElementById("match-count");
    let timer = null;
    async function count() {
      const url = selector.dataset.matchCount + "?selector=" + encodeURIComponent(selector.value);
      try {
        const r = await fetch(url, { credentials: "same-origin" });
        const data = await r.json();
        out.textContent = r.ok
          ? `${data.count} device(s) match, ${data.online} online`
          : `selector: ${data.error}`;
        out.classList.toggle("field-error", !r.ok);
      } catch (e) {
        out.textContent = "";
      }
    }
    selector.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(count, 250); });
    count();
  }
})();
