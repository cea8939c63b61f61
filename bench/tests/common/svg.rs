//! A chart read back: the texts of an SVG document (also the chart's unit tests use it).

/// The trimmed text of every `<text>` element of `svg`, in document order.
pub fn texts(svg: &str) -> Vec<String> {
    let doc = roxmltree::Document::parse(svg).expect("well-formed SVG");
    doc.descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .map(|t| t.trim().to_string())
        .collect()
}
