// A node-opcua server for plantgate's OPC UA tests: it supports TransferSubscriptions
// and Republish, which asyncua's own server does only partly.
//
//   node server.js PORT [PERIOD_MS]
//
// ns=1;s=Counter  UInt32, +1 every PERIOD_MS (default 100)
// ns=1;s=Running  Boolean, toggles with every tenth counter value
// Users: operator / s3cret (anonymous allowed too). node-opcua transfers a subscription to a
// session of the same user; anonymous ones only over a signed channel from the same
// application (OPC UA Part 4, 5.13.7).
// Prints "ready opc.tcp://127.0.0.1:PORT" on stdout once it accepts connections; stops on SIGTERM.
"use strict";
const { OPCUAServer } = require("node-opcua-server");
const { Variant, DataType } = require("node-opcua-variant");
const { StatusCodes } = require("node-opcua-status-code");

async function main() {
    const port = parseInt(process.argv[2], 10);
    const period = parseInt(process.argv[3] || "100", 10);
    const server = new OPCUAServer({
        port,
        hostname: "127.0.0.1",
        resourcePath: "",
        buildInfo: { productName: "plantgate-test-peer" },
        serverCapabilities: { maxSessions: 20 },
        allowAnonymous: true,
        userManager: { isValidUser: (user, password) => user === "operator" && password === "s3cret" },
    });
    await server.initialize();
    const addressSpace = server.engine.addressSpace;
    const namespace = addressSpace.getOwnNamespace();
    const device = namespace.addObject({ organizedBy: addressSpace.rootFolder.objects, browseName: "Press" });
    let counter = 0;
    const counterNode = namespace.addVariable({
        componentOf: device,
        nodeId: "s=Counter",
        browseName: "Counter",
        dataType: "UInt32",
        minimumSamplingInterval: 0,
        value: new Variant({ dataType: DataType.UInt32, value: 0 }),
    });
    const runningNode = namespace.addVariable({
        componentOf: device,
        nodeId: "s=Running",
        browseName: "Running",
        dataType: "Boolean",
        minimumSamplingInterval: 0,
        value: new Variant({ dataType: DataType.Boolean, value: false }),
    });
    const timer = setInterval(() => {
        counter += 1;
        counterNode.setValueFromSource(new Variant({ dataType: DataType.UInt32, value: counter }), StatusCodes.Good);
        if (counter % 10 === 0) {
            runningNode.setValueFromSource(new Variant({ dataType: DataType.Boolean, value: (counter / 10) % 2 === 1 }));
        }
    }, period);
    await server.start();
    process.stdout.write(`ready opc.tcp://127.0.0.1:${port}\n`);
    const stop = async () => {
        clearInterval(timer);
        await server.shutdown(0);
        process.exit(0);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
}

main().catch((err) => {
    process.stderr.write(`node-opcua test server failed: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
});
