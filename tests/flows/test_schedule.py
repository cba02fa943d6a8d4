from flows.schedule import DATA_UPDATED, build_deployment


def test_deployment_has_cron_schedule_and_data_trigger():
    d = build_deployment("0 */6 * * *")
    assert [s.schedule.cron for s in d.schedules] == ["0 */6 * * *"]
    (trigger,) = d.triggers
    assert trigger.expect == {DATA_UPDATED}
    assert d.entrypoint.endswith("flows/lifecycle.py:lifecycle")
