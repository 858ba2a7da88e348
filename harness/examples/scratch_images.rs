fn main() {
    let d = std::path::Path::new("/tmp/cdx");
    let w = kof_harness::images::write_pause_image(&d.join("pause.tar"), "kof/pause:1").unwrap();
    println!("{w:?}");
    let w =
        kof_harness::images::write_empty_image(&d.join("empty.tar"), "flox/empty:1.0.0").unwrap();
    println!("{w:?}");
    let t = d.join("bbtree");
    let _ = std::fs::create_dir_all(t.join("bin"));
    let _ = std::fs::copy("/bin/busybox", t.join("bin/busybox"));
    for a in ["sh", "echo", "cat", "sleep"] {
        let _ = std::os::unix::fs::symlink("busybox", t.join("bin").join(a));
    }
    let w = kof_harness::images::write_dir_image(
        &d.join("bb.tar"),
        "kof/busybox:1",
        &t,
        &Default::default(),
    )
    .unwrap();
    println!("{w:?}");
}
