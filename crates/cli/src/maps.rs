//! `waymark maps`: journey maps (stages with standard times, interactions, dead ends) on
//! the analytics service. A map file is the proto3 JSON mapping of `JourneyMap` in YAML or
//! JSON (`journey_file`).

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use waymark_kit::config::Config;
use waymark_proto::analytics::v1::*;

use crate::client::{admin, rpc_error};
use crate::journey_file::{Format, print, print_all, print_document, read, write_stdout};
use crate::report::{AnalyticsTarget, Output, connect, text};

#[derive(Subcommand)]
pub enum MapsCommand {
    /// Create or replace a journey map from a file; prints the map as saved, as JSON.
    Apply {
        /// The map, YAML or JSON (`.json`).
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Print every journey map: one line each, or all of them as JSON.
    List {
        /// A table, or the maps as proto3 JSON.
        #[arg(long, value_enum, default_value = "table")]
        format: Output,
    },
    /// Print a journey map as a file `apply` takes.
    Get {
        /// The map's id.
        id: String,
        /// YAML or JSON.
        #[arg(long, value_enum, default_value = "yaml")]
        format: DocumentFormat,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DocumentFormat {
    Yaml,
    Json,
}

pub async fn run(
    config: &Config,
    target: &AnalyticsTarget,
    command: MapsCommand,
) -> anyhow::Result<()> {
    let (mut client, endpoint) = connect(config, target)?;
    let fail = |status| rpc_error(status, &endpoint);
    match command {
        MapsCommand::Apply { file } => {
            let map = read::<JourneyMap>(&file)?;
            let saved = client
                .put_journey_map(admin(config, PutJourneyMapRequest { map: Some(map) })?)
                .await
                .map_err(fail)?
                .into_inner();
            print(&saved.map.unwrap_or_default())
        }
        MapsCommand::List { format } => {
            let maps = client
                .list_journey_maps(admin(config, ListJourneyMapsRequest {})?)
                .await
                .map_err(fail)?
                .into_inner()
                .maps;
            match format {
                Output::Json => print_all(&maps),
                Output::Table => write_stdout(text::maps(&maps, text::terminal_width()).as_bytes()),
            }
        }
        MapsCommand::Get { id, format } => {
            let found = client
                .get_journey_map(admin(config, GetJourneyMapRequest { id })?)
                .await
                .map_err(fail)?
                .into_inner();
            let format = match format {
                DocumentFormat::Yaml => Format::Yaml,
                DocumentFormat::Json => Format::Json,
            };
            print_document(&found.map.unwrap_or_default(), format)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use waymark_orchestrator::schedule::parse_duration;

    use super::*;

    #[test]
    fn the_example_map_decodes_as_a_journey_map() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/maps/retail.yaml");
        let map = read::<JourneyMap>(&path).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(map.id, "retail");
        let stages: Vec<&str> = map.stages.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            stages,
            [
                "need", "research", "select", "convert", "own", "loyalty", "advocacy"
            ]
        );
        for stage in &map.stages {
            assert!(!stage.entered_by.is_empty(), "{} has no event", stage.id);
            assert!(stage.entered_by.iter().all(|m| !m.event.is_empty()));
            if !stage.standard_time.is_empty() {
                parse_duration(&stage.standard_time)
                    .unwrap_or_else(|e| panic!("{}: {e}", stage.id));
            }
        }
        let ticket = map
            .interactions
            .iter()
            .find(|i| i.id == "support-ticket")
            .expect("the support ticket interaction");
        assert_eq!(
            ticket.start.as_ref().unwrap().event,
            "Support Ticket Created"
        );
        assert_eq!(
            ticket.end.as_ref().unwrap().event,
            "Support Ticket Resolved"
        );
        assert_eq!(
            parse_duration(&ticket.standard_time).unwrap().as_secs(),
            86_400
        );
        for interaction in &map.interactions {
            parse_duration(&interaction.standard_time)
                .unwrap_or_else(|e| panic!("{}: {e}", interaction.id));
        }
        let dead_ends: Vec<&str> = map.dead_ends.iter().map(|d| d.event.as_str()).collect();
        assert!(
            dead_ends.contains(&"Product Search No Results"),
            "{dead_ends:?}"
        );
        assert!(dead_ends.contains(&"Checkout Failed"), "{dead_ends:?}");
        assert!(map.write_back);
    }

    #[tokio::test]
    async fn an_invalid_map_file_is_refused_before_any_call() {
        // Nothing listens on port 9: the error must come from reading the file.
        let target = AnalyticsTarget {
            endpoint: Some("http://127.0.0.1:9".into()),
        };
        let file =
            std::env::temp_dir().join(format!("waymark-bad-map-{}.yaml", std::process::id()));
        std::fs::write(
            &file,
            "id: retail\nstages:\n  - id: need\n    enteredBy: [{ event: Page Viewed }]\n    standardTme: 2d\n",
        )
        .unwrap();
        let error = run(
            &Config::default(),
            &target,
            MapsCommand::Apply { file: file.clone() },
        )
        .await
        .unwrap_err();
        std::fs::remove_file(&file).unwrap();
        let error = format!("{error:#}");
        assert!(error.contains("is not a valid JourneyMap"), "{error}");
        assert!(error.contains("stages[0]: "), "{error}");
        assert!(error.contains("'standardTme'"), "{error}");
        assert!(error.contains("standardTime"), "{error}");
    }
}
