// Charts as SVG drawn from the platform's own numbers: bars over time and
// sparklines. Each has a text alternative for screen readers.

const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attributes = {}, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  element.append(...children);
  return element;
}

/**
 * A bar chart of `points` ([{label, value}]) titled `title`; `format` writes
 * a value for the axis and the tooltips.
 */
export function bars(title, points, format = (v) => v.toLocaleString()) {
  const width = 640;
  const height = 180;
  const left = 56;
  const bottom = 22;
  const top = 8;
  const most = Math.max(0, ...points.map((p) => p.value));
  const scale = most > 0 ? (height - top - bottom) / most : 0;
  const step = points.length > 0 ? (width - left) / points.length : 0;
  const chart = svg(
    'svg',
    { viewBox: `0 0 ${width} ${height}`, class: 'chart', role: 'img', 'aria-label': `${title}: ${summary(points, format)}` },
    svg('title', {}, title),
    svg('line', { x1: left, y1: height - bottom, x2: width, y2: height - bottom, class: 'axis' }),
    svg('text', { x: left - 6, y: top + 10, 'text-anchor': 'end', class: 'tick' }, format(most)),
    svg('text', { x: left - 6, y: height - bottom, 'text-anchor': 'end', class: 'tick' }, format(0)),
  );
  points.forEach((point, index) => {
    const barHeight = point.value * scale;
    const x = left + index * step + step * 0.15;
    const bar = svg('rect', {
      x,
      y: height - bottom - barHeight,
      width: Math.max(1, step * 0.7),
      height: barHeight,
      class: 'bar',
    });
    bar.append(svg('title', {}, `${point.label}: ${format(point.value)}`));
    chart.append(bar);
    // As many labels as fit.
    const every = Math.ceil(points.length / 8);
    if (index % every === 0) {
      chart.append(svg('text', { x: x + step * 0.35, y: height - 6, 'text-anchor': 'middle', class: 'tick' }, point.label));
    }
  });
  return chart;
}

function summary(points, format) {
  if (points.length === 0) return 'no data';
  const total = points.reduce((sum, p) => sum + p.value, 0);
  return `${format(total)} in all over ${points.length} periods`;
}

/** A small line of the last values of a series (e.g. a queue's depth). */
export function sparkline(values, label) {
  const width = 120;
  const height = 28;
  const most = Math.max(1, ...values);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const line = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / most) * (height - 4)).toFixed(1)}`).join(' ');
  return svg(
    'svg',
    { viewBox: `0 0 ${width} ${height}`, class: 'spark', role: 'img', 'aria-label': `${label}: now ${values.at(-1) ?? 0}, at most ${most}` },
    svg('polyline', { points: line || `0,${height - 2} ${width},${height - 2}`, class: 'spark-line' }),
  );
}

/** A histogram's buckets as small bars (`{le, count}` as `GET /v1/models` gives them). */
export function histogram(distribution, label) {
  const width = 120;
  const height = 28;
  const buckets = distribution.buckets;
  const most = Math.max(1, ...buckets.map((b) => b.count));
  const step = width / buckets.length;
  const chart = svg('svg', {
    viewBox: `0 0 ${width} ${height}`,
    class: 'spark',
    role: 'img',
    'aria-label': `${label}: ${buckets.filter((b) => b.count).map((b) => `${b.count} up to ${b.le ?? 'more'}`).join(', ') || 'none yet'}`,
  });
  buckets.forEach((bucket, index) => {
    const barHeight = (bucket.count / most) * (height - 2);
    const bar = svg('rect', { x: index * step + 1, y: height - barHeight, width: Math.max(1, step - 2), height: barHeight, class: 'spark-bar' });
    bar.append(svg('title', {}, `≤ ${bucket.le ?? '∞'}: ${bucket.count}`));
    chart.append(bar);
  });
  return chart;
}
