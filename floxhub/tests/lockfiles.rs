//! Every real Flox lockfile in the shared data set (`../shared/data/flox-lockfiles`, beside the
//! checkout, as on every developer machine and in CI) parses, and yields, for each
//! system, the store paths to install. The expected paths were read out of the files with jq
//! (`.packages[] | select(.system==S) | .outputs[(.outputs_to_install // ."outputs-to-install")[]]`),
//! not produced by this code.

use std::path::PathBuf;

use kof_floxhub::lockfile::{Lockfile, PackageSource};

const SYSTEMS: [&str; 4] = [
    "x86_64-linux",
    "aarch64-linux",
    "x86_64-darwin",
    "aarch64-darwin",
];

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/flox-lockfiles")
}

fn load(name: &str) -> Lockfile {
    let text = std::fs::read_to_string(data_dir().join(name)).unwrap();
    Lockfile::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn roots(lf: &Lockfile, system: &str) -> Vec<String> {
    lf.roots_for(system).iter().map(|p| p.to_string()).collect()
}

/// (file, [x86_64-linux, aarch64-linux, x86_64-darwin, aarch64-darwin] roots)
const EXPECTED: &[(&str, [&[&str]; 4])] = &[
    (
        "hello.manifest.lock.json",
        [
            &["/nix/store/nm7p8wxflggcwxfzayhysq4z6a1wg373-hello-2.12.3"],
            &["/nix/store/qpp9968dpkv1c755nk13mrkrzpsvah18-hello-2.12.3"],
            &["/nix/store/1jmrg17ff86dgxmx6iaqb4lsnc0rj5vd-hello-2.12.3"],
            &["/nix/store/srhnlxadg479lhf3r6ijjc0arsxaimzs-hello-2.12.3"],
        ],
    ),
    (
        "flake_hello.manifest.lock.json",
        [
            &["/nix/store/i3zw7h6pg3n9r5i63iyqxrapa70i4v5w-hello-2.12.2"],
            &["/nix/store/rdi64cigphnc1f28lxlxay51cxnfa3vs-hello-2.12.2"],
            &["/nix/store/l8abcf6wk04p2aainyc3pbk091fq8snp-hello-2.12.2"],
            &["/nix/store/z9ljhwdfsydrdjri5fzg599y78nah34j-hello-2.12.2"],
        ],
    ),
    (
        "go_gcc.manifest.lock.json",
        [
            &[
                "/nix/store/dxqah042znlglapf07vha4qannacibf2-gcc-wrapper-15.2.0-man",
                "/nix/store/gb0njhqswlc5n127ikgyikvq39r40l6f-go-1.26.4",
                "/nix/store/xcnqqnhw9hb4j5rjgds2yjryi8qki5f3-gcc-wrapper-15.2.0",
            ],
            &[
                "/nix/store/07nfp0wv2yk9k6h7qg5h3nhgxkkr9hc3-gcc-wrapper-15.2.0-man",
                "/nix/store/lgcj27hrbanbc93xm9zdrldds7b1jrw8-go-1.26.4",
                "/nix/store/lx4f4lvm5hrbxbils30ssjal1jz9yxgh-gcc-wrapper-15.2.0",
            ],
            &[
                "/nix/store/h0z6ghmi3cihlbm163d72xs9p9nn04a1-go-1.26.4",
                "/nix/store/vlqks7r68963zr1jbj8l546w4nw0i762-clang-wrapper-21.1.8",
            ],
            &[
                "/nix/store/kyai650rrywrzflnwda9mbk2c2j9w68r-go-1.26.4",
                "/nix/store/qndx79izh6lanm535xj9pbayy6j8fz5n-clang-wrapper-21.1.8",
            ],
        ],
    ),
    (
        "hello_other_pkg_group.manifest.lock.json",
        [
            &["/nix/store/lxra5fkapsdbdjqi6wa205s7vmqh1vxb-hello-2.12.3"],
            &["/nix/store/4z8ys247h2242760a0pw6y9akab2n09l-hello-2.12.3"],
            &[],
            &["/nix/store/v4f0jj9sz97ckskvacf40llz4nfr19jf-hello-2.12.3"],
        ],
    ),
    (
        "kitchen_sink.manifest.lock.json",
        [
            &["/nix/store/lxra5fkapsdbdjqi6wa205s7vmqh1vxb-hello-2.12.3"],
            &["/nix/store/4z8ys247h2242760a0pw6y9akab2n09l-hello-2.12.3"],
            &[],
            &["/nix/store/v4f0jj9sz97ckskvacf40llz4nfr19jf-hello-2.12.3"],
        ],
    ),
    (
        "krb5_prereqs.manifest.lock.json",
        [
            &[
                "/nix/store/arjpl2nnq7khwfhy16qphyxxg924apy1-gnumake-4.4.1-man",
                "/nix/store/dxqah042znlglapf07vha4qannacibf2-gcc-wrapper-15.2.0-man",
                "/nix/store/k9ybsvscqk4lhz5ndc1ap9800im1cry1-gnumake-4.4.1",
                "/nix/store/l9k0anq0z7zz81zcwy035jfwap9ga6rl-python3-3.13.13",
                "/nix/store/xcnqqnhw9hb4j5rjgds2yjryi8qki5f3-gcc-wrapper-15.2.0",
                "/nix/store/zvj0hl7rhh0ccr5vkcg3ijs3xm3sgyac-nodejs-24.16.0",
            ],
            &[
                "/nix/store/07nfp0wv2yk9k6h7qg5h3nhgxkkr9hc3-gcc-wrapper-15.2.0-man",
                "/nix/store/3c96gbpypik8gzasv9brnka3i6mks9rz-gnumake-4.4.1-man",
                "/nix/store/60vys190zxlx4k1jz0kyvk4vydzr7qml-nodejs-24.16.0",
                "/nix/store/lx4f4lvm5hrbxbils30ssjal1jz9yxgh-gcc-wrapper-15.2.0",
                "/nix/store/smwd56pl54f0pcjdspgh5vnf20c8xwsc-python3-3.13.13",
                "/nix/store/v1888rzl1qf8zzd27q1vxvqqssizjx3x-gnumake-4.4.1",
            ],
            &[
                "/nix/store/0bg5b97b9hbhz8907bfcrch1i116xppa-gnumake-4.4.1",
                "/nix/store/1137mc2md1ip5pdslybxl05kysjyh4rg-python3-3.13.13",
                "/nix/store/1ds7fzv776scji0fa32p4hlgi5hwy1wv-libcxx-21.1.8",
                "/nix/store/9hfqvrhg6kg6nk727wqsh2hj1gz2nq8q-clang-wrapper-20.1.8",
                "/nix/store/9qsshnr2kdgrrklj8flz0zrwgi7zqswb-cctools-1010.6-man",
                "/nix/store/v04l0kjhdvbzkzrnw6ryf43dp8v0qapv-nodejs-24.16.0",
                "/nix/store/wb4yn3d7vmi1hr4f8pz38rjvcl7f70ma-gnumake-4.4.1-man",
                "/nix/store/xyxzs362snwyw4k1d6yw467381pl5af3-cctools-1010.6",
            ],
            &[
                "/nix/store/05zb83k72p9ynnvsy4rpi6x57sc052jj-cctools-1010.6",
                "/nix/store/1zm1xb652wk1kscxbcvbryq8y45b0gy5-nodejs-24.16.0",
                "/nix/store/64wlca9wqsn3xzsc08qsls751pg968y7-clang-wrapper-20.1.8",
                "/nix/store/a3pdvi0093x4dibfv20sydi10z9p1xhl-libcxx-21.1.8",
                "/nix/store/ij3d5cfr8h31a41l80jzid0z6kj2ajsv-gnumake-4.4.1",
                "/nix/store/lw6sl3z4b6jk5nsynp9is0cmiwj08m29-cctools-1010.6-man",
                "/nix/store/mfkdmplffnbc0av8r6pknl796a6b1r2n-python3-3.13.13",
                "/nix/store/mzy3b5lxi8jbq5d63yvq52sjsq73907l-gnumake-4.4.1-man",
            ],
        ],
    ),
];

#[test]
fn every_real_lockfile_is_covered_and_parses() {
    let mut names: Vec<String> = std::fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    let mut expected: Vec<String> = EXPECTED.iter().map(|(n, _)| n.to_string()).collect();
    expected.sort();
    assert_eq!(
        names, expected,
        "a lockfile in the data set has no expectations here"
    );
    for name in &names {
        let lf = load(name);
        assert!(!lf.packages.is_empty(), "{name}");
    }
}

#[test]
fn roots_per_system_match_the_files() {
    for (name, per_system) in EXPECTED {
        let lf = load(name);
        for (system, want) in SYSTEMS.iter().zip(per_system.iter()) {
            let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
            assert_eq!(roots(&lf, system), want, "{name} {system}");
        }
        assert!(lf.roots_for("riscv64-linux").is_empty());
    }
}

#[test]
fn package_details_are_kept() {
    let lf = load("hello.manifest.lock.json");
    let pkgs = lf.packages_for("x86_64-linux");
    assert_eq!(pkgs.len(), 1);
    let p = pkgs[0];
    assert_eq!(p.install_id, "hello");
    assert_eq!(p.system, "x86_64-linux");
    assert_eq!(p.priority, 5);
    assert_eq!(p.pname.as_deref(), Some("hello"));
    assert_eq!(p.version.as_deref(), Some("2.12.3"));
    assert_eq!(
        p.outputs_to_install.as_deref(),
        Some(&["out".to_string()][..])
    );
    assert_eq!(
        p.outputs["out"].to_string(),
        "/nix/store/nm7p8wxflggcwxfzayhysq4z6a1wg373-hello-2.12.3"
    );
    assert!(
        matches!(&p.source, PackageSource::Catalog { group: Some(g), attr_path: Some(a), .. } if g == "toplevel" && a == "hello")
    );
    assert_eq!(
        lf.manifest.options.systems.as_deref(),
        Some(
            &[
                "aarch64-darwin".to_string(),
                "aarch64-linux".into(),
                "x86_64-darwin".into(),
                "x86_64-linux".into()
            ][..]
        )
    );
    assert!(lf.vars().is_empty());
    assert_eq!(lf.hook(), None);

    // Flake entries: `outputs-to-install`, `locked-url`.
    let lf = load("flake_hello.manifest.lock.json");
    let p = lf.packages_for("aarch64-linux")[0];
    assert!(
        matches!(&p.source, PackageSource::Flake { locked_url: Some(u), locked_flake_attr_path: Some(a) }
        if u.starts_with("github:NixOS/nixpkgs/") && a == "legacyPackages.aarch64-linux.hello")
    );
    assert_eq!(
        p.outputs_to_install.as_deref(),
        Some(&["out".to_string()][..])
    );

    // Duplicated `outputs_to_install` entries (real data) are deduplicated; priorities kept.
    let lf = load("krb5_prereqs.manifest.lock.json");
    let gcc = lf
        .packages_for("x86_64-linux")
        .into_iter()
        .find(|p| p.install_id == "gcc")
        .unwrap();
    assert_eq!(
        gcc.outputs_to_install.as_deref(),
        Some(&["man".to_string(), "out".into()][..])
    );
    assert_eq!(gcc.outputs.len(), 3);
    let cctools = lf.packages_for("x86_64-darwin");
    assert_eq!(
        cctools
            .iter()
            .find(|p| p.install_id == "cctools")
            .unwrap()
            .priority,
        6
    );
    assert_eq!(lf.packages_for("x86_64-linux").len(), 4);
    assert_eq!(
        lf.systems(),
        vec![
            "aarch64-darwin",
            "aarch64-linux",
            "x86_64-darwin",
            "x86_64-linux"
        ]
    );

    // vars and the on-activate hook.
    let lf = load("kitchen_sink.manifest.lock.json");
    assert_eq!(lf.vars().len(), 1);
    assert_eq!(lf.vars()["VARS_SECTION_VAR"], "vars_section_var");
    let hook = lf.hook().unwrap();
    assert!(
        hook.contains("export HOOK_SECTION_VAR=\"hook_section_var\""),
        "{hook}"
    );
    assert!(lf.manifest.profile.as_ref().unwrap()["bash"]
        .as_str()
        .unwrap()
        .contains("profile-bash"));
    assert_eq!(
        lf.systems(),
        vec!["aarch64-darwin", "aarch64-linux", "x86_64-linux"]
    );
}
