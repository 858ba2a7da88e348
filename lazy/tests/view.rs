//! Views: the buildEnv-style merge (priorities, conflicts, symlinked directories), the root
//! layout, and a view of the real fixture environment kof/python fetched into a real store.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::sync::{Arc, Mutex};

use kof_fuse::{Content, Entry};
use kof_lazy::view::{build_view, rendered_env_path, InstalledPath, View, ViewError, ViewInput};
use kof_nar::StorePath;

// ---- hand-built trees ----

fn file(text: &str) -> Arc<Entry> {
    Arc::new(Entry::Regular {
        executable: false,
        content: Content::Inline(Arc::from(text.as_bytes())),
    })
}

fn exe(text: &str) -> Arc<Entry> {
    Arc::new(Entry::Regular {
        executable: true,
        content: Content::Inline(Arc::from(text.as_bytes())),
    })
}

fn sym(target: &str) -> Arc<Entry> {
    Arc::new(Entry::Symlink(target.into()))
}

fn dir(entries: Vec<(&str, Arc<Entry>)>) -> Arc<Entry> {
    Arc::new(Entry::Directory(
        entries
            .into_iter()
            .map(|(n, e)| (OsString::from(n), e))
            .collect(),
    ))
}

/// A store path named `name` with a hash derived from it.
fn sp(name: &str) -> StorePath {
    let h = kof_nar::NixHash::digest(name.as_bytes());
    let hash = kof_nar::base32::encode(&h.0[..20]);
    StorePath::from_base_name(&format!("{hash}-{name}")).unwrap()
}

struct Pkg {
    path: StorePath,
    priority: u64,
    tree: Arc<Entry>,
}

fn pkg(name: &str, priority: u64, tree: Arc<Entry>) -> Pkg {
    Pkg {
        path: sp(name),
        priority,
        tree,
    }
}

fn input(pkgs: &[&Pkg], extra: &[(StorePath, Arc<Entry>)]) -> ViewInput {
    let mut paths: BTreeMap<StorePath, Arc<Entry>> = pkgs
        .iter()
        .map(|p| (p.path.clone(), p.tree.clone()))
        .collect();
    for (p, e) in extra {
        paths.insert(p.clone(), e.clone());
    }
    ViewInput {
        owner: "kof".into(),
        name: "test".into(),
        generation: 1,
        installed: pkgs
            .iter()
            .map(|p| InstalledPath {
                path: p.path.clone(),
                priority: p.priority,
            })
            .collect(),
        paths,
    }
}

/// The entry at `path` (absolute, inside the view) without following a final symlink;
/// intermediate symlinks are followed like the kernel does (absolute targets are inside the
/// view). Returns the entry and its canonical path.
fn lookup(root: &Arc<Entry>, path: &str, follow_last: bool) -> Option<(Arc<Entry>, String)> {
    let mut todo: Vec<String> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .map(String::from)
        .rev()
        .collect();
    let mut stack: Vec<(String, Arc<Entry>)> = Vec::new();
    let mut hops = 0;
    while let Some(part) = todo.pop() {
        match part.as_str() {
            "." => continue,
            ".." => {
                stack.pop();
                continue;
            }
            _ => {}
        }
        let cur = stack.last().map(|(_, e)| e.clone()).unwrap_or(root.clone());
        let Entry::Directory(children) = &*cur else {
            return None;
        };
        let next = children.get(OsStr::new(&part))?.clone();
        if let Entry::Symlink(t) = &*next {
            if !todo.is_empty() || follow_last {
                hops += 1;
                assert!(hops < 40, "symlink loop at {path}");
                let t = t.to_str().unwrap();
                if t.starts_with('/') {
                    stack.clear();
                }
                for p in t.split('/').filter(|p| !p.is_empty()).rev() {
                    todo.push(p.to_string());
                }
                continue;
            }
        }
        stack.push((part, next));
    }
    let canon = format!(
        "/{}",
        stack
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join("/")
    );
    Some((
        stack.last().map(|(_, e)| e.clone()).unwrap_or(root.clone()),
        canon,
    ))
}

fn content_of(e: &Entry) -> String {
    match e {
        Entry::Regular {
            content: Content::Inline(b),
            ..
        } => String::from_utf8(b.to_vec()).unwrap(),
        other => panic!("not an inline file: {other:?}"),
    }
}

/// The contents of the file `rel` of the rendered environment, following symlinks.
fn env_file(v: &View, rel: &str) -> String {
    let path = format!("{}/{rel}", v.flox_env());
    let (e, _) = lookup(&v.root, &path, true).unwrap_or_else(|| panic!("{path} resolves"));
    content_of(&e)
}

fn env_entry(v: &View, rel: &str) -> Option<Arc<Entry>> {
    lookup(&v.root, &format!("{}/{rel}", v.flox_env()), false).map(|(e, _)| e)
}

fn names(e: &Entry) -> Vec<String> {
    match e {
        Entry::Directory(c) => c.keys().map(|k| k.to_string_lossy().into_owned()).collect(),
        other => panic!("not a directory: {other:?}"),
    }
}

/// Captures tracing output while `f` runs.
fn with_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let b2 = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || b2.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let out = tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

#[test]
fn merges_packages_into_one_tree_of_symlinks() {
    let a = pkg(
        "a-1",
        5,
        dir(vec![
            ("bin", dir(vec![("a", exe("A"))])),
            (
                "share",
                dir(vec![(
                    "man",
                    dir(vec![("man1", dir(vec![("a.1", file("a man"))]))]),
                )]),
            ),
            ("lib", dir(vec![("liba.so", file("liba"))])),
            ("nix-support", dir(vec![("setup-hook", file("x"))])),
        ]),
    );
    let b = pkg(
        "b-1",
        5,
        dir(vec![
            ("bin", dir(vec![("b", exe("B"))])),
            (
                "share",
                dir(vec![
                    (
                        "man",
                        dir(vec![("man1", dir(vec![("b.1", file("b man"))]))]),
                    ),
                    (
                        "doc",
                        dir(vec![("b", dir(vec![("README", file("readme"))]))]),
                    ),
                ]),
            ),
        ]),
    );
    let (v, logs) = with_logs(|| build_view(&input(&[&a, &b], &[])).unwrap());
    assert!(!logs.contains("WARN"), "no conflict, no warning: {logs}");
    // Files are symlinks to their absolute path in their package.
    assert_eq!(
        *env_entry(&v, "bin/a").unwrap(),
        Entry::Symlink(format!("{}/bin/a", a.path.to_absolute()).into())
    );
    assert_eq!(
        *env_entry(&v, "bin/b").unwrap(),
        Entry::Symlink(format!("{}/bin/b", b.path.to_absolute()).into())
    );
    assert_eq!(names(&env_entry(&v, "bin").unwrap()), ["a", "b"]);
    // Directories both provide are merged recursively; one only one provides is a symlink.
    assert_eq!(
        names(&env_entry(&v, "share/man/man1").unwrap()),
        ["a.1", "b.1"]
    );
    assert_eq!(
        *env_entry(&v, "share/doc").unwrap(),
        Entry::Symlink(format!("{}/share/doc", b.path.to_absolute()).into())
    );
    // Top-level directories are real even with one provider.
    assert_eq!(names(&env_entry(&v, "lib").unwrap()), ["liba.so"]);
    assert_eq!(env_file(&v, "share/man/man1/a.1"), "a man");
    assert_eq!(env_file(&v, "share/doc/b/README"), "readme");
    assert_eq!(env_file(&v, "lib/liba.so"), "liba");
    // Build metadata is not merged.
    assert!(env_entry(&v, "nix-support").is_none());
    assert_eq!(
        names(&lookup(&v.root, &v.flox_env(), true).unwrap().0),
        ["bin", "lib", "share"]
    );
}

#[test]
fn lower_priority_number_wins_and_equal_priority_keeps_the_first_with_a_warning() {
    let tree = |who: &str| dir(vec![("bin", dir(vec![("tool", exe(who))]))]);
    // B is later in lockfile order but has the better priority.
    let a = pkg("a-1", 5, tree("A"));
    let b = pkg("b-1", 1, tree("B"));
    let (v, logs) = with_logs(|| build_view(&input(&[&a, &b], &[])).unwrap());
    assert_eq!(env_file(&v, "bin/tool"), "B");
    assert!(!logs.contains("WARN"), "settled by priority: {logs}");
    // Reversed priorities: A wins.
    let b9 = pkg("b-1", 9, tree("B"));
    let v = build_view(&input(&[&a, &b9], &[])).unwrap();
    assert_eq!(env_file(&v, "bin/tool"), "A");
    // Equal priority: the first in lockfile order, and a warning naming both.
    let b5 = pkg("b-1", 5, tree("B"));
    let (v, logs) = with_logs(|| build_view(&input(&[&b5, &a], &[])).unwrap());
    assert_eq!(env_file(&v, "bin/tool"), "B");
    assert!(logs.contains("WARN"), "{logs}");
    assert!(
        logs.contains(&format!("{}/bin/tool", a.path.to_absolute()))
            && logs.contains(&format!("{}/bin/tool", b5.path.to_absolute())),
        "the warning names both files: {logs}"
    );
}

#[test]
fn conflicts_between_a_file_and_a_directory_go_by_priority() {
    let a = pkg(
        "a-1",
        5,
        dir(vec![("lib", dir(vec![("foo", file("file"))]))]),
    );
    let b = pkg(
        "b-1",
        3,
        dir(vec![(
            "lib",
            dir(vec![("foo", dir(vec![("x", file("x"))]))]),
        )]),
    );
    let v = build_view(&input(&[&a, &b], &[])).unwrap();
    assert_eq!(env_file(&v, "lib/foo/x"), "x");
    let b7 = pkg(
        "b-1",
        7,
        dir(vec![(
            "lib",
            dir(vec![("foo", dir(vec![("x", file("x"))]))]),
        )]),
    );
    let v = build_view(&input(&[&a, &b7], &[])).unwrap();
    assert_eq!(env_file(&v, "lib/foo"), "file");
}

#[test]
fn symlinked_directories_are_unfolded_when_merged() {
    // A's share/icons is a relative symlink to a directory of its own; B has a real
    // share/icons: the merge holds both packages' icons.
    let a = pkg(
        "a-1",
        5,
        dir(vec![
            ("share", dir(vec![("icons", sym("../icons-real"))])),
            ("icons-real", dir(vec![("a.png", file("a icon"))])),
        ]),
    );
    let b = pkg(
        "b-1",
        5,
        dir(vec![(
            "share",
            dir(vec![("icons", dir(vec![("b.png", file("b icon"))]))]),
        )]),
    );
    for order in [[&a, &b], [&b, &a]] {
        let v = build_view(&input(&order, &[])).unwrap();
        assert_eq!(
            names(&env_entry(&v, "share/icons").unwrap()),
            ["a.png", "b.png"]
        );
        assert_eq!(env_file(&v, "share/icons/a.png"), "a icon");
        assert_eq!(env_file(&v, "share/icons/b.png"), "b icon");
    }
    // A top-level symlink to a directory (lib -> lib64) is a real directory in the merge,
    // also when the directory is in another closure member.
    let dep = sp("dep-1");
    let c = pkg(
        "c-1",
        5,
        dir(vec![
            ("lib", sym("lib64")),
            ("lib64", dir(vec![("libc.so", file("libc"))])),
            ("include", sym(&format!("{}/include", dep.to_absolute()))),
        ]),
    );
    let d = pkg(
        "d-1",
        5,
        dir(vec![("lib", dir(vec![("libd.so", file("libd"))]))]),
    );
    let dep_tree = dir(vec![("include", dir(vec![("dep.h", file("header"))]))]);
    let v = build_view(&input(&[&c, &d], &[(dep.clone(), dep_tree)])).unwrap();
    assert_eq!(
        names(&env_entry(&v, "lib").unwrap()),
        ["libc.so", "libd.so"]
    );
    assert_eq!(env_file(&v, "lib/libc.so"), "libc");
    assert_eq!(names(&env_entry(&v, "include").unwrap()), ["dep.h"]);
    assert_eq!(env_file(&v, "include/dep.h"), "header");
}

#[test]
fn the_root_holds_exactly_the_closure_and_the_system_files() {
    let bash = pkg(
        "bash-5.2",
        5,
        dir(vec![("bin", dir(vec![("bash", exe("bash"))]))]),
    );
    let coreutils = pkg(
        "coreutils-9.1",
        5,
        dir(vec![(
            "bin",
            dir(vec![("env", exe("env")), ("ls", exe("ls"))]),
        )]),
    );
    let glibc = sp("glibc-2.36");
    let inp = input(
        &[&bash, &coreutils],
        &[(glibc.clone(), dir(vec![("lib", dir(vec![]))]))],
    );
    let v = build_view(&inp).unwrap();
    // nix/store: the closure and the rendered environment, nothing else.
    let (store, _) = lookup(&v.root, "/nix/store", false).unwrap();
    let mut expected: Vec<String> = [&bash.path, &coreutils.path, &glibc, &v.env_path]
        .iter()
        .map(|p| p.base_name())
        .collect();
    expected.sort();
    assert_eq!(names(&store), expected);
    assert!(v.flox_env().starts_with("/nix/store/"));
    assert!(v.env_path.base_name().ends_with("-flox-env-test"));
    // Closure members are the trees given, shared.
    let (g, _) = lookup(&v.root, &glibc.to_absolute(), false).unwrap();
    assert!(Arc::ptr_eq(&g, &inp.paths[&glibc]));
    // bin/sh and usr/bin/env come from the environment.
    let bash_bin = format!("{}/bin/bash", bash.path.to_absolute());
    assert_eq!(v.bash.as_deref(), Some(bash_bin.as_str()));
    let (sh, canon) = lookup(&v.root, "/bin/sh", true).unwrap();
    assert_eq!(content_of(&sh), "bash");
    assert_eq!(canon, bash_bin);
    let (env, canon) = lookup(&v.root, "/usr/bin/env", true).unwrap();
    assert_eq!(content_of(&env), "env");
    assert_eq!(canon, format!("{}/bin/env", coreutils.path.to_absolute()));
    // etc files and mount points.
    let (passwd, _) = lookup(&v.root, "/etc/passwd", true).unwrap();
    let passwd = content_of(&passwd);
    assert!(passwd.starts_with("root:x:0:0:"), "{passwd}");
    assert!(passwd.contains("\nnobody:x:65534:65534:"), "{passwd}");
    for f in ["group", "nsswitch.conf", "hosts"] {
        let (e, _) = lookup(&v.root, &format!("/etc/{f}"), true).unwrap();
        assert!(!content_of(&e).is_empty(), "{f}");
    }
    for d in [
        "proc", "sys", "dev", "tmp", "run", "var/tmp", "root", "home",
    ] {
        let (e, _) = lookup(&v.root, &format!("/{d}"), false).unwrap();
        assert!(
            matches!(&*e, Entry::Directory(c) if c.is_empty()),
            "/{d} is an empty dir"
        );
    }
    assert_eq!(
        names(&v.root),
        ["bin", "dev", "etc", "home", "nix", "proc", "root", "run", "sys", "tmp", "usr", "var"]
    );
}

#[test]
fn bin_sh_prefers_the_environment_sh_and_is_absent_without_a_shell() {
    let bash = pkg(
        "bash-5.2",
        5,
        dir(vec![(
            "bin",
            dir(vec![("bash", exe("bash")), ("sh", sym("bash"))]),
        )]),
    );
    let v = build_view(&input(&[&bash], &[])).unwrap();
    assert_eq!(
        *lookup(&v.root, "/bin/sh", false).unwrap().0,
        Entry::Symlink(format!("{}/bin/sh", bash.path.to_absolute()).into())
    );
    let jq = pkg(
        "jq-1.6",
        5,
        dir(vec![("bin", dir(vec![("jq", exe("jq"))]))]),
    );
    let v = build_view(&input(&[&jq], &[])).unwrap();
    assert!(v.bash.is_none());
    assert!(lookup(&v.root, "/bin", false).is_none());
    assert!(lookup(&v.root, "/usr/bin", false).is_none());
    // The environment's programs are on the default PATH through /usr/local/bin (for a process
    // that is not activated); it has no sbin, so there is no /usr/local/sbin.
    assert_eq!(
        *lookup(&v.root, "/usr/local/bin", false).unwrap().0,
        Entry::Symlink(format!("{}/bin", v.flox_env()).into())
    );
    assert!(lookup(&v.root, "/usr/local/sbin", false).is_none());
}

#[test]
fn the_rendered_path_is_a_deterministic_digest_of_the_installation() {
    let a = pkg("a-1", 5, dir(vec![]));
    let b = pkg("b-1", 5, dir(vec![]));
    let p1 = rendered_env_path(&input(&[&a, &b], &[])).unwrap();
    assert_eq!(p1, rendered_env_path(&input(&[&a, &b], &[])).unwrap());
    assert_eq!(p1.hash_part().len(), 32);
    let b1 = pkg("b-1", 1, dir(vec![]));
    assert_ne!(p1, rendered_env_path(&input(&[&a, &b1], &[])).unwrap());
    assert_ne!(p1, rendered_env_path(&input(&[&b, &a], &[])).unwrap());
    assert_ne!(p1, rendered_env_path(&input(&[&a], &[])).unwrap());
    // Odd characters in the environment name are made store-path-safe.
    let mut odd = input(&[&a], &[]);
    odd.name = "my env/ü".into();
    let p = rendered_env_path(&odd).unwrap();
    assert!(p.name().starts_with("flox-env-my-env-"), "{p}");
}

#[test]
fn an_installed_path_without_a_tree_is_an_error() {
    let a = pkg("a-1", 5, dir(vec![]));
    let mut inp = input(&[&a], &[]);
    inp.paths.clear();
    match build_view(&inp) {
        Err(ViewError::InstalledNotInClosure { path, env }) => {
            assert_eq!(path, a.path);
            assert_eq!(env, "kof/test:1");
        }
        other => panic!("expected InstalledNotInClosure, got {other:?}"),
    }
}

// ---- the real fixture environment ----

mod real {
    use super::*;
    use kof_fixtures::serve::{self, ServeConfig};
    use kof_floxhub::client::FloxHubClient;
    use kof_floxhub::resolve::Resolver;
    use kof_node_api::config::Config;
    use kof_node_api::envref::EnvRef;
    use kof_store::{NodeKind, Store};
    use kof_substituter::fetcher::Fetcher;

    /// A stored path's tree as a view entry (every file's bytes found by its NAR offset).
    fn entry_of(store: &Store, p: &StorePath) -> Arc<Entry> {
        let nodes = store.tree(p).unwrap();
        let mut children: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for n in &nodes {
            if let Some(parent) = n.parent {
                children.entry(parent).or_default().push(n.id);
            }
        }
        let by_id: BTreeMap<u64, &kof_store::TreeNode> = nodes.iter().map(|n| (n.id, n)).collect();
        fn build(
            id: u64,
            rel: &str,
            p: &StorePath,
            by_id: &BTreeMap<u64, &kof_store::TreeNode>,
            children: &BTreeMap<u64, Vec<u64>>,
        ) -> Arc<Entry> {
            let n = by_id[&id];
            Arc::new(match &n.kind {
                NodeKind::Directory => Entry::Directory(
                    children
                        .get(&id)
                        .into_iter()
                        .flatten()
                        .map(|c| {
                            let name = String::from_utf8(by_id[c].name.clone()).unwrap();
                            let r = if rel.is_empty() {
                                name.clone()
                            } else {
                                format!("{rel}/{name}")
                            };
                            (OsString::from(&name), build(*c, &r, p, by_id, children))
                        })
                        .collect(),
                ),
                NodeKind::Regular {
                    executable,
                    content,
                } => Entry::Regular {
                    executable: *executable,
                    content: Content::Store(kof_fuse::FileRef {
                        store_path: p.base_name().into(),
                        path: rel.into(),
                        nar_offset: n.nar_offset.unwrap(),
                        size: content.size,
                    }),
                },
                NodeKind::Symlink { target } => {
                    Entry::Symlink(OsString::from(String::from_utf8(target.clone()).unwrap()))
                }
            })
        }
        build(0, "", p, &by_id, &children)
    }

    #[test]
    fn view_of_kof_python_from_a_real_store() {
        let (dir, manifest) = kof_testkit::fixtures();
        let server = serve::start_in_background(ServeConfig::new(dir));
        let tmp = tempfile::tempdir().unwrap();
        let text = format!(
            "floxhub_url = \"{}\"\nsubstituters = [\"{}\"]\ntrusted_public_keys = [\"{}\"]\nstore_dir = \"{}\"\n",
            server.git_base(),
            server.cache_url("zstd"),
            manifest.public_key,
            tmp.path().join("store").display()
        );
        let config = Config::parse(&text, &tmp.path().join("config.toml")).unwrap();
        let store = Arc::new(Store::open(&config.store_dir).unwrap());
        let client =
            FloxHubClient::new(&config.floxhub_url, config.store_dir.join("floxmeta")).unwrap();
        let env = Resolver::new(client, config.system.clone())
            .resolve(&EnvRef::parse("kof/python").unwrap(), None)
            .unwrap();
        let fetcher = Fetcher::from_config(&config, store.clone()).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let closure = rt.block_on(async {
            fetcher.fetch_closure(&env.roots, None).await.unwrap();
            fetcher.resolve(&env.roots).await.unwrap()
        });
        let paths: BTreeMap<StorePath, Arc<Entry>> = closure
            .paths()
            .into_iter()
            .map(|p| {
                let e = entry_of(&store, &p);
                (p, e)
            })
            .collect();
        let inp = ViewInput::new(&env, paths.clone());
        // Priorities come from the lockfile: every fixture package has Flox's default, 5.
        assert_eq!(inp.installed.len(), env.roots.len());
        assert!(inp.installed.iter().all(|i| i.priority == 5));
        let v = build_view(&inp).unwrap();

        // FLOX_ENV/bin/python3 is a symlink into the closure, which resolves to an
        // executable file stored there.
        let py = format!("{}/bin/python3", v.flox_env());
        let (link, _) = lookup(&v.root, &py, false).unwrap();
        let Entry::Symlink(target) = &*link else {
            panic!("{py} is a symlink, got {link:?}");
        };
        let target = target.to_str().unwrap();
        let base = target
            .strip_prefix("/nix/store/")
            .unwrap()
            .split('/')
            .next()
            .unwrap();
        let target_path = StorePath::from_base_name(base).unwrap();
        assert!(
            paths.contains_key(&target_path),
            "{target} is in the closure"
        );
        let (exe, canon) = lookup(&v.root, &py, true).unwrap();
        assert!(
            matches!(&*exe, Entry::Regular { executable: true, content: Content::Store(f) } if f.size > 0),
            "{py} resolves to an executable store file at {canon}"
        );
        // nix/store is exactly the closure plus the rendered environment.
        let (store_dir, _) = lookup(&v.root, "/nix/store", false).unwrap();
        let mut expected: Vec<String> = paths.keys().map(|p| p.base_name()).collect();
        expected.push(v.env_path.base_name());
        expected.sort();
        assert_eq!(names(&store_dir), expected);
        // The environment has bash: bin/sh and the hook's interpreter are it.
        let bash = v.bash.clone().expect("kof/python installs bash");
        let (_, canon) = lookup(&v.root, "/bin/sh", true).unwrap();
        assert!(
            canon.starts_with("/nix/store/") && canon.contains("-bash-"),
            "{canon}"
        );
        assert!(bash.ends_with("/bin/bash"));
        let (_, canon) = lookup(&v.root, "/usr/bin/env", true).unwrap();
        assert!(canon.contains("-coreutils-"), "{canon}");
        server.shutdown();
    }
}
