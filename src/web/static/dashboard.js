// Keeps the dashboard current without a full reload: fetches this same page again and, when
// its data changed (data-version), swaps <main> for the new one. The server says how often
// to look (data-refresh-seconds): often while outcomes are coming in, seldom when idle.
"use strict";

(() => {
  const byId = () => document.getElementById("dashboard");

  // This page's URL without user:password@ (opened so, some browsers keep them in location,
  // and fetch() refuses a URL with credentials); the browser sends them for the page's own
  // origin by itself.
  const here = () => {
    const url = new URL(window.location.href);
    url.username = "";
    url.password = "";
    return url.href;
  };

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
      const response = await fetch(here(), { cache: "no-store", headers: { Accept: "text/html" } });
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
