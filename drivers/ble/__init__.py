"""BLE air-quality sensors: the advertisement decoders (:mod:`drivers.ble.formats`, pure, no
I/O), the per-sensor duplicate and replay filter (:mod:`drivers.ble.dedupe`) and the bleak
driver that listens to the advertisements (:mod:`drivers.ble.driver`)."""
