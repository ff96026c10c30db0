//! A table before rendering, and its two renderings: aligned plain text for the terminal and
//! markdown for `table.md`.

use std::fmt::Write as _;

/// A table before rendering.
pub struct Table {
    pub title: String,
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
    pub notes: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Text,
    Markdown,
}

impl Style {
    pub fn table(self, table: &Table) -> String {
        let mut out = String::new();
        match self {
            Style::Markdown => {
                let _ = writeln!(out, "\n**{}**\n", table.title);
                let _ = writeln!(out, "| {} |", table.headers.join(" | "));
                let _ = writeln!(
                    out,
                    "|{}",
                    table.headers.iter().map(|_| "---|").collect::<String>()
                );
                for row in &table.rows {
                    let _ = writeln!(out, "| {} |", row.join(" | "));
                }
                if !table.notes.is_empty() {
                    out.push('\n');
                }
                for note in &table.notes {
                    let _ = writeln!(out, "{note}  ");
                }
            }
            Style::Text => {
                let widths: Vec<usize> = (0..table.headers.len())
                    .map(|column| {
                        std::iter::once(table.headers[column].chars().count())
                            .chain(
                                table
                                    .rows
                                    .iter()
                                    .map(|row| row.get(column).map_or(0, |c| c.chars().count())),
                            )
                            .max()
                            .unwrap_or(0)
                    })
                    .collect();
                let line = |cells: Vec<&str>| {
                    cells
                        .iter()
                        .zip(&widths)
                        .enumerate()
                        .map(|(column, (cell, &width))| {
                            let pad = " ".repeat(width - cell.chars().count());
                            if column == 0 {
                                format!("{cell}{pad}")
                            } else {
                                format!("{pad}{cell}")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join("  ")
                };
                let _ = writeln!(out, "\n{}", table.title);
                let _ = writeln!(out, "{}", line(table.headers.clone()));
                for row in &table.rows {
                    let _ = writeln!(out, "{}", line(row.iter().map(String::as_str).collect()));
                }
                for note in &table.notes {
                    let _ = writeln!(out, "  {note}");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_tables_align_columns() {
        let table = Table {
            title: "t".into(),
            headers: vec!["name", "value"],
            rows: vec![
                vec!["a".into(), "1".into()],
                vec!["bbbbbb".into(), "22".into()],
            ],
            notes: vec![],
        };
        assert_eq!(
            Style::Text.table(&table),
            "\nt\nname    value\na           1\nbbbbbb     22\n"
        );
        assert!(Style::Markdown.table(&table).contains("| bbbbbb | 22 |"));
    }
}
