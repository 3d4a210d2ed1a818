//! Command-line flags of the load-generating benches: `--flag value` or `--flag=value`,
//! `-h`/`--help`, and the `--bench` that cargo appends.

use anyhow::{Context, Result, bail};

/// Walks `args`, handing each flag, with a way to take its value, to `flag`, which answers
/// whether it knew the flag. `-h`/`--help` prints `usage` and exits; an argument starting
/// with `--bench` (cargo bench appends one to the arguments of harness = false targets) is
/// passed over; anything else is an error that shows `usage`.
pub fn parse(
    args: &[String],
    usage: &str,
    mut flag: impl FnMut(&str, &mut dyn FnMut() -> Result<String>) -> Result<bool>,
) -> Result<()> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .with_context(|| format!("{name} needs a value\n{usage}"))
        };
        if flag(name, &mut value)? {
            continue;
        }
        match name {
            "-h" | "--help" => {
                println!("{usage}");
                std::process::exit(0);
            }
            f if f.starts_with("--bench") => {}
            other => bail!("unknown argument {other:?}\n{usage}"),
        }
    }
    Ok(())
}
