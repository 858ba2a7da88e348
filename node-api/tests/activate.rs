//! Activation: the environment composed as `flox activate -- CMD` does, and the hook really
//! sourced by a real bash before the command runs.

use std::collections::BTreeMap;
use std::process::Command;

use kof_node_api::activate::{activate, ActivateError, ActivationInput, BASE_PATH, HOOK_VAR};

const FLOX_ENV: &str = "/nix/store/00000000000000000000000000000000-flox-env-demo";

fn input() -> ActivationInput {
    ActivationInput {
        env: "kof/demo:3".into(),
        flox_env: FLOX_ENV.into(),
        description: "demo".into(),
        vars: BTreeMap::from([
            ("GREETING".to_string(), "hello world".to_string()),
            ("JAVA_HOME".to_string(), "$FLOX_ENV".to_string()),
            (
                "LIBS".to_string(),
                "${FLOX_ENV}/lib:$UNSET_THING".to_string(),
            ),
            ("PRICE".to_string(), "\\$5 and $ alone".to_string()),
        ]),
        hook: None,
        bash: None,
        home: "/root".into(),
        term: Some("xterm-256color".into()),
        inherit: BTreeMap::new(),
    }
}

#[test]
fn an_inherited_environment_is_the_base_and_activation_wins_over_it() {
    let mut i = input();
    i.inherit = BTreeMap::from([
        ("PATH".to_string(), "/opt/image/bin:/bin".to_string()),
        ("HOME".to_string(), "/home/app".to_string()),
        (
            "KUBERNETES_SERVICE_HOST".to_string(),
            "10.0.0.1".to_string(),
        ),
        ("GREETING".to_string(), "from the pod".to_string()),
        ("FLOX_ENV".to_string(), "/somewhere/else".to_string()),
    ]);
    let a = activate(&i, &cmd(&["true"])).unwrap();
    // The container's PATH follows the environment's directories, instead of the base PATH.
    assert_eq!(
        a.var("PATH"),
        Some(format!("{FLOX_ENV}/bin:{FLOX_ENV}/sbin:/opt/image/bin:/bin").as_str())
    );
    assert_eq!(a.var("HOME"), Some("/home/app"));
    assert_eq!(a.var("KUBERNETES_SERVICE_HOST"), Some("10.0.0.1"));
    // [vars] and activation's own variables win, as `flox activate` exports over its caller's.
    assert_eq!(a.var("GREETING"), Some("hello world"));
    assert_eq!(a.var("FLOX_ENV"), Some(FLOX_ENV));
    assert_eq!(a.var("TERM"), Some("xterm-256color"));
}

fn cmd(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
fn composes_the_environment_like_flox_activate() {
    let a = activate(&input(), &cmd(&["python3", "-c", "print(1)"])).unwrap();
    // No hook: the command as given, to be looked up on the activated PATH.
    assert_eq!(a.argv, cmd(&["python3", "-c", "print(1)"]));
    let env: BTreeMap<&str, &str> = a
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        env,
        BTreeMap::from([
            ("FLOX_ENV", FLOX_ENV),
            ("FLOX_ENV_DESCRIPTION", "demo"),
            ("GREETING", "hello world"),
            ("HOME", "/root"),
            ("JAVA_HOME", FLOX_ENV),
            ("LIBS", &*format!("{FLOX_ENV}/lib:")),
            (
                "PATH",
                &*format!("{FLOX_ENV}/bin:{FLOX_ENV}/sbin:{BASE_PATH}")
            ),
            ("PRICE", "$5 and $ alone"),
            ("TERM", "xterm-256color"),
        ])
    );
    assert_eq!(a.var("FLOX_ENV"), Some(FLOX_ENV));
}

#[test]
fn vars_may_extend_path_and_cannot_displace_flox_env() {
    let mut i = input();
    i.term = None;
    i.vars = BTreeMap::from([
        ("PATH".to_string(), "/opt/tool/bin:$PATH".to_string()),
        ("FLOX_ENV".to_string(), "/elsewhere".to_string()),
    ]);
    let a = activate(&i, &cmd(&["true"])).unwrap();
    assert_eq!(
        a.var("PATH").unwrap(),
        format!("{FLOX_ENV}/bin:{FLOX_ENV}/sbin:/opt/tool/bin:{BASE_PATH}")
    );
    assert_eq!(a.var("FLOX_ENV"), Some(FLOX_ENV));
    assert_eq!(a.var("TERM"), None);
}

#[test]
fn the_hook_is_sourced_by_bash_before_the_command_execs() {
    let mut i = input();
    // The host's bash stands in for the environment's: the script is what is tested.
    i.bash = Some("/bin/bash".into());
    i.hook = Some(
        "export HOOKED=\"yes:$GREETING\"\necho 'hook output' \nexport PATH=\"/hook/bin:$PATH\"\n"
            .into(),
    );
    // The command is looked up on the PATH as the hook left it.
    let a = activate(
        &i,
        &cmd(&[
            "sh",
            "-c",
            "echo \"$HOOKED|$0|$1|${_KOF_ON_ACTIVATE-unset}|${PATH%%:*}\"",
            "arg zero",
            "arg one",
        ]),
    )
    .unwrap();
    assert_eq!(a.argv[0], "/bin/bash");
    assert_eq!(a.argv[1], "-c");
    assert_eq!(
        &a.argv[4..],
        &cmd(&[
            "sh",
            "-c",
            "echo \"$HOOKED|$0|$1|${_KOF_ON_ACTIVATE-unset}|${PATH%%:*}\"",
            "arg zero",
            "arg one"
        ])[..]
    );
    assert_eq!(a.var(HOOK_VAR), i.hook.as_deref());
    let out = Command::new(&a.argv[0])
        .args(&a.argv[1..])
        .env_clear()
        .envs(a.env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The hook's exports reach the command, its stdout went to stderr, the hook variable is
    // gone, and the arguments arrive intact.
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "yes:hello world|arg zero|arg one|unset|/hook/bin\n"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "hook output\n");

    // The command's exit status is its own.
    let a = activate(&i, &cmd(&["sh", "-c", "exit 7"])).unwrap();
    let st = Command::new(&a.argv[0])
        .args(&a.argv[1..])
        .env_clear()
        .envs(a.env.iter().map(|(k, v)| (k, v)))
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(7));
}

#[test]
fn a_hook_without_bash_is_a_clear_error() {
    let mut i = input();
    i.hook = Some("export X=1".into());
    let e = activate(&i, &cmd(&["true"])).unwrap_err();
    assert!(
        matches!(e, ActivateError::HookWithoutBash { ref env } if env == "kof/demo:3"),
        "{e:?}"
    );
    let msg = e.to_string();
    assert!(msg.contains("kof/demo:3") && msg.contains("bash"), "{msg}");
}

#[test]
fn refuses_what_no_process_can_carry() {
    assert!(matches!(
        activate(&input(), &[]),
        Err(ActivateError::NoCommand { .. })
    ));
    let mut i = input();
    i.vars.insert("NOT-A-NAME".into(), "x".into());
    assert!(matches!(
        activate(&i, &cmd(&["true"])),
        Err(ActivateError::BadVarName { ref name, .. }) if name == "NOT-A-NAME"
    ));
    let mut i = input();
    i.vars.insert("NUL".into(), "a\0b".into());
    assert!(matches!(
        activate(&i, &cmd(&["true"])),
        Err(ActivateError::Nul { .. })
    ));
}
