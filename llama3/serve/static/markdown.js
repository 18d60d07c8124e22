// A small Markdown renderer for the model's replies. It builds DOM nodes and sets text with textContent: nothing
// the model writes is ever parsed as HTML, so no reply can inject markup, styles or scripts. It covers what chat
// models write: fenced code blocks, headings, bullet and numbered lists, block quotes, paragraphs, and inline
// code, bold, italic and http(s) links. An unclosed code fence (a reply still streaming) runs to the end.
"use strict";

const INLINE = /`([^`\n]+)`|\*\*(\S(?:.*?\S)?)\*\*|__(\S(?:.*?\S)?)__|\*(\S(?:.*?\S)?)\*|(?<![\w])_(\S(?:.*?\S)?)_(?![\w])|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g;

function inlineNodes(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    let el;
    if (m[1] !== undefined) {
      el = document.createElement("code");
      el.textContent = m[1];
    } else if (m[2] !== undefined || m[3] !== undefined) {
      el = document.createElement("strong");
      el.append(...inlineNodes(m[2] ?? m[3]));
    } else if (m[4] !== undefined || m[5] !== undefined) {
      el = document.createElement("em");
      el.append(...inlineNodes(m[4] ?? m[5]));
    } else {
      el = document.createElement("a");
      el.href = m[7];  // only http(s): the pattern admits no javascript: or data: URLs
      el.rel = "noopener noreferrer nofollow";
      el.target = "_blank";
      el.append(...inlineNodes(m[6]));
    }
    out.push(el);
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;  // strings become text nodes in append()
}

function element(tag, text) {
  const el = document.createElement(tag);
  el.append(...inlineNodes(text));
  return el;
}

function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let paragraph = [];  // lines of the paragraph being gathered
  let list = null;     // the <ul>/<ol> being filled
  let quote = null;    // the <blockquote> being filled
  const endBlocks = () => {
    if (paragraph.length) root.appendChild(element("p", paragraph.join("\n")));
    paragraph = [];
    list = quote = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/);
    if (fence) {
      endBlocks();
      const code = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) code.push(lines[i]);
      const pre = document.createElement("pre"), block = document.createElement("code");
      if (fence[2]) block.dataset.language = fence[2];
      block.textContent = code.join("\n");
      pre.appendChild(block);
      root.appendChild(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/);
    const quoted = line.match(/^>\s?(.*)$/);
    if (heading) {
      endBlocks();
      // "#" is a section of a reply, not a page title: h3 and smaller.
      root.appendChild(element("h" + Math.min(6, heading[1].length + 2), heading[2]));
    } else if (item) {
      const ordered = /\d/.test(item[1]);
      if (!list || (list.tagName === "OL") !== ordered) {
        endBlocks();
        list = document.createElement(ordered ? "ol" : "ul");
        if (ordered && parseInt(item[1], 10) !== 1) list.start = parseInt(item[1], 10);
        root.appendChild(list);
      }
      list.appendChild(element("li", item[2]));
    } else if (quoted) {
      if (!quote) {
        endBlocks();
        quote = root.appendChild(document.createElement("blockquote"));
      } else {
        quote.append("\n");
      }
      quote.append(...inlineNodes(quoted[1]));
    } else if (!line.trim()) {
      endBlocks();
    } else if (list && /^\s/.test(line)) {  // an indented line continues the list item
      list.lastChild.append("\n", ...inlineNodes(line.trim()));
    } else {
      if (list || quote) endBlocks();
      paragraph.push(line);
    }
  }
  endBlocks();
  return root;
}
