// Keeps the dashboard current without a full reload: fetches this same page again and, when
// its data changed (data-version), swaps <main> for the new one. The server says how often
// to look (data-refresh-seconds): often while outcomes are coming in, seldom when idle.
"use strict";

(() => {
  const byId = () => document.getElementById("dashboard");

  const schedule = (main) => {
    const seconds = Number(main.dataset.refreshSeconds) || 30;
    window.setTimeout(refresh, seconds * 1000);
  };

  async function refresh() {
    const current = byId();
    if (document.hidden) {
      schedule(current);
      return;
    }
    let next = current;
    try {
      const response = await fetch(window.location.href, { cache: "no-store", headers: { Accept: "text/html" } });
      if (response.ok) {
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = page.getElementById("dashboard");
        if (fresh && fresh.dataset.version !== current.dataset.version) {
          next = document.importNode(fresh, true);
          current.replaceWith(next);
        } else if (fresh) {
          current.dataset.refreshSeconds = fresh.dataset.refreshSeconds;
        }
        document.documentElement.dataset.refreshedAt = new Date().toISOString();
      }
    } catch (error) {
      // The server is restarting or the network is down: keep the page, look again later.
    }
    schedule(next);
  }

  if (byId()) {
    schedule(byId());
  }
})();
