// meter console: a stacked bar chart drawn as plain SVG (no library, works offline).
// drawStackedBars(container, {buckets: [label], series: [{name, values: [number]}], format})
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#ec4899", "#84cc16", "#9ca3af"];

  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A round upper bound for the axis: 1, 2 or 5 times a power of ten.
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function drawStackedBars(container, data) {
    container.textContent = "";
    const { buckets, series, format } = data;
    if (!buckets.length) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = "No requests in this range.";
      container.appendChild(p);
      return;
    }
    const W = 1100, H = 260, left = 70, right = 190, top = 10, bottom = 40;
    const plotW = W - left - right, plotH = H - top - bottom;
    const totals = buckets.map((_, i) => series.reduce((s, ser) => s + (ser.values[i] || 0), 0));
    const max = niceMax(Math.max(...totals));
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "stacked bars over time" });
    const axis = el("g", { class: "axis" });
    for (let t = 0; t <= 4; t++) {
      const v = (max * t) / 4, y = top + plotH - (plotH * t) / 4;
      axis.appendChild(el("line", { class: "grid", x1: left, x2: left + plotW, y1: y, y2: y }));
      axis.appendChild(el("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, format(v)));
    }
    svg.appendChild(axis);
    const step = plotW / buckets.length;
    const barW = Math.max(1, Math.min(48, step * 0.8));
    const labelEvery = Math.ceil(buckets.length / 12);
    buckets.forEach((label, i) => {
      const x = left + i * step + (step - barW) / 2;
      let y = top + plotH;
      series.forEach((ser, s) => {
        const v = ser.values[i] || 0;
        if (v <= 0) return;
        const h = (plotH * v) / max;
        y -= h;
        const rect = el("rect", { x, y, width: barW, height: Math.max(h, 0.5), fill: COLORS[s % COLORS.length] });
        rect.appendChild(el("title", {}, `${label}  ${ser.name}: ${format(v)}`));
        svg.appendChild(rect);
      });
      if (i % labelEvery === 0) {
        svg.appendChild(el("text", { class: "axis", x: left + i * step + step / 2, y: H - bottom + 16, "text-anchor": "middle", "font-size": 11, fill: "#6b7385" }, label));
      }
    });
    const legend = el("g", { class: "legend" });
    series.forEach((ser, s) => {
      const y = top + 8 + s * 20;
      legend.appendChild(el("rect", { x: W - right + 16, y: y - 9, width: 12, height: 12, fill: COLORS[s % COLORS.length] }));
      const name = ser.name.length > 22 ? ser.name.slice(0, 21) + "…" : ser.name;
      legend.appendChild(el("text", { x: W - right + 34, y: y + 1 }, name));
    });
    svg.appendChild(legend);
    container.appendChild(svg);
  }

  window.meterChart = { drawStackedBars, COLORS };
})();
