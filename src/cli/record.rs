//! `coffre record`: put, get, find, delete from the command line.

use super::*;

pub(super) async fn record(g: &Global, cmd: RecordCmd) -> Result<(), CliError> {
    let mut c = RecordsClient::new(connect(g).await?);
    match cmd {
        RecordCmd::Put => {
            let mut input = Zeroizing::new(String::new());
            std::io::stdin().read_to_string(&mut input).map_err(err)?;
            #[derive(serde::Deserialize)]
            struct In {
                #[serde(default)]
                id: String,
                fields: std::collections::HashMap<String, String>,
            }
            let rec: In = serde_json::from_str(&input).map_err(|_| {
                err("stdin must be JSON: {\"id\": \"...\", \"fields\": {\"name\": \"value\"}}")
            })?;
            let r = c
                .put_record(authed(
                    g,
                    pb::PutRecordRequest {
                        record: Some(pb::Record {
                            id: rec.id,
                            fields: rec.fields,
                            version: 0,
                        }),
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            say(
                g,
                &format!("stored {} version {}", r.id, r.version),
                json!({"id": r.id, "version": r.version}),
            );
        }
        RecordCmd::Get {
            id,
            fields,
            purpose,
        } => {
            let r = c
                .get_record(authed(
                    g,
                    pb::GetRecordRequest {
                        id,
                        fields,
                        purpose,
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner()
                .record
                .unwrap_or_default();
            let fields: std::collections::BTreeMap<_, _> = r.fields.into_iter().collect();
            println!(
                "{}",
                json!({"id": r.id, "version": r.version, "fields": fields})
            );
        }
        RecordCmd::Find { field, purpose } => {
            let value = read_secret("value: ", false)?;
            let r = c
                .find_records(authed(
                    g,
                    pb::FindRecordsRequest {
                        field,
                        value: value.to_string(),
                        purpose,
                    },
                )?)
                .await
                .map_err(status_err)?
                .into_inner();
            if g.json {
                println!("{}", json!({"ids": r.ids}));
            } else {
                for id in r.ids {
                    println!("{id}");
                }
            }
        }
        RecordCmd::Delete { id, purpose } => {
            c.delete_record(authed(
                g,
                pb::DeleteRecordRequest {
                    id: id.clone(),
                    purpose,
                },
            )?)
            .await
            .map_err(status_err)?;
            say(g, &format!("deleted {id}"), json!({"id": id}));
        }
    }
    Ok(())
}
