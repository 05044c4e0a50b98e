//! The daemon's layer map (the table at the top of `src/lib.rs`) checked against the code:
//! every room imports only the rooms the map allows, and the sub-modules of each room
//! import each other without cycles. Run with `--nocapture` to print the module graph.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The map in `lib.rs`: each room and the rooms it may import (`None`: any).
fn layer_map() -> BTreeMap<String, Option<BTreeSet<String>>> {
    let lib = fs::read_to_string(source_dir().join("lib.rs")).expect("lib.rs");
    let mut map = BTreeMap::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! | `") else {
            continue;
        };
        let cells: Vec<&str> = row.split(" | ").collect();
        let name = cells[0].trim_end_matches('`').to_owned();
        let allowed = cells
            .last()
            .expect("a row has cells")
            .trim_end_matches(" |");
        let allowed = match allowed.trim() {
            "everything" => None,
            "—" => Some(BTreeSet::new()),
            list => Some(
                list.split(',')
                    .map(|m| m.trim().trim_matches('`').to_owned())
                    .collect(),
            ),
        };
        map.insert(name, allowed);
    }
    map
}

/// The code of a file without comments and without its unit tests (which close a file).
fn code_of(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("a source file");
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The names that follow `prefix` in `code` (`crate::audit` gives `audit`).
fn names_after<'a>(code: &'a str, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    code.match_indices(prefix).map(move |(at, _)| {
        let rest = &code[at + prefix.len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        &rest[..end]
    })
}

/// Which rooms each room imports (`crate::room` anywhere in its files).
fn room_graph(rooms: &BTreeSet<String>) -> Graph {
    let mut graph = Graph::new();
    for room in rooms {
        let mut files = Vec::new();
        let file = source_dir().join(format!("{room}.rs"));
        if file.exists() {
            files.push(file);
        }
        rust_files(&source_dir().join(room), &mut files);
        let imports = graph.entry(room.clone()).or_default();
        for file in files {
            let code = code_of(&file);
            for name in names_after(&code, "crate::") {
                if name != room && rooms.contains(name) {
                    imports.insert(name.to_owned());
                }
            }
        }
    }
    graph
}

/// How the sub-modules of one room (files in `src/room/`) import each other: through
/// `super::name` or `crate::room::name`, including names inside `use super::{...}`.
fn inner_graph(room: &str) -> Graph {
    let dir = source_dir().join(room);
    let Ok(entries) = fs::read_dir(&dir) else {
        return Graph::new();
    };
    let children: BTreeSet<String> = entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let stem = path.file_stem()?.to_str()?.to_owned();
            (path.extension().is_some_and(|x| x == "rs") || path.is_dir()).then_some(stem)
        })
        .collect();
    let mut graph = Graph::new();
    for child in &children {
        let mut files = Vec::new();
        let file = dir.join(format!("{child}.rs"));
        if file.exists() {
            files.push(file);
        }
        rust_files(&dir.join(child), &mut files);
        let imports = graph.entry(child.clone()).or_default();
        let own = format!("crate::{room}::");
        for file in files {
            let code = code_of(&file);
            let mut named: Vec<&str> = names_after(&code, "super::")
                .chain(names_after(&code, &own))
                .collect();
            // `use super::{a, b::{c}, d};`: every path that opens the group.
            for (at, _) in code.match_indices("use super::{") {
                let group = &code[at..];
                let group = &group[..group.find(';').unwrap_or(group.len())];
                for piece in group.split(['{', ',']) {
                    let piece = piece.trim();
                    let end = piece
                        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                        .unwrap_or(piece.len());
                    named.push(&piece[..end]);
                }
            }
            for name in named {
                if name != child && children.contains(name) {
                    imports.insert(name.to_owned());
                }
            }
        }
    }
    graph
}

/// A cycle in `graph`, if it has one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn print(title: &str, graph: &Graph) {
    println!("{title}");
    for (module, imports) in graph {
        let imports: Vec<&str> = imports.iter().map(String::as_str).collect();
        println!("  {module} -> {}", imports.join(", "));
    }
}

#[test]
fn every_room_imports_only_what_the_layer_map_allows() {
    let map = layer_map();
    let rooms: BTreeSet<String> = map.keys().cloned().collect();
    let lib = fs::read_to_string(source_dir().join("lib.rs")).expect("lib.rs");
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("pub(crate) mod "))
                .or_else(|| line.strip_prefix("mod "))?;
            Some(rest.trim_end_matches(';').to_owned())
        })
        .collect();
    assert_eq!(
        declared, rooms,
        "every module of lib.rs has a row in its layer map"
    );
    let graph = room_graph(&rooms);
    print("rooms:", &graph);
    let mut breaches = Vec::new();
    for (room, imports) in &graph {
        if let Some(Some(allowed)) = map.get(room) {
            for import in imports.difference(allowed) {
                breaches.push(format!("{room} imports {import}"));
            }
        }
    }
    assert!(
        breaches.is_empty(),
        "imports the layer map in lib.rs does not allow: {breaches:?}"
    );
    assert_eq!(find_cycle(&graph), None, "the rooms import in a cycle");
}

#[test]
fn the_modules_of_each_room_import_each_other_without_cycles() {
    let mut cycles = Vec::new();
    for room in layer_map().keys() {
        let graph = inner_graph(room);
        if graph.is_empty() {
            continue;
        }
        print(&format!("{room}:"), &graph);
        if let Some(cycle) = find_cycle(&graph) {
            cycles.push(format!("{room}: {}", cycle.join(" -> ")));
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import in a cycle: {cycles:?}"
    );
}

#[test]
fn the_checker_finds_a_cycle_and_only_a_cycle() {
    let edges = |pairs: &[(&str, &str)]| {
        let mut graph = Graph::new();
        for (from, to) in pairs {
            graph
                .entry((*from).to_owned())
                .or_default()
                .insert((*to).to_owned());
        }
        graph
    };
    assert_eq!(
        find_cycle(&edges(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        find_cycle(&edges(&[("a", "b"), ("a", "c"), ("b", "c")])),
        None
    );
}
